// sphere forest: one arena of many MCTS trees (one per problem), struct-of-arrays, integer node ids.
//
// Text never enters C++: a node carries an int64 payload id into a Python-side step store. C++ never
// calls back into Python. All methods take raw arrays (the binding checks shapes/dtypes) and are batched
// over many trees, so a search round is O(1) binding calls. No randomness: the same operation sequence
// gives the same tree, bit for bit, as the pure-Python reference (sphere/engine/reference.py).
//
// Node layout: bytes per node = kBytesPerNode = 54. The fields that selection reads for every child are
// one 32-byte hot record (two per cache line; a node's children are contiguous, so scanning 5 children
// touches 2-3 lines and the chosen child's first_child is already loaded). Everything else is
// struct-of-arrays, one std::vector per field, read by backup, extraction and the snapshot.
//   hot record `Hot` (std::vector<Hot>, 32 B, static_assert)      cold arrays (22 B)
//   value_sum    f64 8  sum of backed-up values                   parent  i32 4  -1 for a root
//   first_child  i32 4  -1 until expanded (children contiguous)   payload i64 8  id into the Python step store
//   visits       i32 4  completed backups through the node        tree    i32 4  tree index (add_roots order)
//   inflight     i32 4  unresolved select() descents through it;  reward  f32 4  step reward given at expansion
//                       returns to 0 after backup/cancel          depth   i16 2  root = 0
//   prior        f32 4  given at expansion (not normalised)
//   init_value   f32 4  initial value estimate, NaN = none
//   num_children u16 2  <= 65535 (checked)
//   flags        u8  1  kTerminal | kExpanded | kPrunedExpand | kPrunedSubtree | kExhausted; bits are only
//                       ever set, never cleared (states only move forward) until reset()
//   pad          u8  1
//
// Semantics
// * A node is exhausted when it is terminal, or pruned, or expanded and every child is exhausted
//   (an expansion with zero children exhausts the leaf). select() never returns or descends into an
//   exhausted node; a tree whose root is exhausted yields no leaves.
// * select(roots, k): k descents per tree, trees in the given order. A descent increments `inflight`
//   on every node it enters (root first) and, at each expanded node, moves to the non-exhausted child
//   with the highest score (lowest index on ties). It ends at the first unexpanded node (a leaf). If that
//   leaf already has inflight > 0 (returned earlier in this call, or by an earlier select not yet backed
//   up / cancelled) the descent is a collision: its inflight increments are removed at once, the tree's
//   collision counter grows, and nothing is returned. After a collision the tree's state is unchanged, so
//   the remaining descents of that tree collide too; they are counted without being walked.
// * Virtual loss blend (weight VL = virtual_loss, pessimistic value L = virtual_loss_value):
//     n_vl  = VL * inflight,  N_eff = visits + n_vl
//     Q     = (value_sum + n_vl * L) / N_eff            if N_eff > 0
//           = FPU                                       otherwise (the child counts as unvisited)
//   FPU: "parent" = parent's mean value (value_sum/visits, else its init_value, else 0) - fpu_reduction;
//        "value" = the child's init_value (NaN -> the "parent" rule); "inf" = +inf; "const" = fpu_value.
//   q_norm: Q <- (Q - qmin) / (qmax - qmin) when qmax > qmin (finite Q only), where [qmin, qmax] is the
//   range of node mean values seen by backup() in this tree (MuZero's MinMaxStats).
//   Parent count P_eff = parent visits + VL * parent inflight (the current descent included).
//   PUCT: score = Q + c * prior * sqrt(P_eff) / (1 + N_eff)
//   UCT:  score = Q + c * sqrt(log(max(P_eff, 1)) / N_eff) for N_eff > 0; an unvisited child scores its
//         FPU (Gelly & Wang's first-play urgency; "inf" = classic UCT, unvisited children first).
//   All arithmetic is double, no FMA contraction (-ffp-contract=off), so Python floats reproduce it.
//   On x86-64 pick_child scores two children at once with SSE2 packed doubles (same operations in the same
//   order per lane, so the same bits as the scalar formula; both sides of "visited ?" are computed and
//   blended); the argmax reads the scores in child order. Other targets use the scalar formula.
// * child_scores(nodes): read-only; for each expanded node, the score of every child (child order, CSR:
//   offsets int64[M+1], scores f64) exactly as the next select() descent that reaches the node would compute
//   it now: same routine as pick_child (Forest::score_children, SSE2 where pick_child uses it), the node's
//   P_eff counting its current in-flight descents plus the one that descent adds on entering it, children's
//   virtual loss, FPU and q_norm as above; an exhausted child (never picked) is reported as -inf. The
//   argmax (lowest index on ties) is the child select() would take. A node that is not expanded raises
//   (std::invalid_argument -> ValueError), an id out of range too (std::out_of_range -> IndexError), naming
//   nodes[i]. An expanded node with zero children contributes no scores.
// * expand(): children of a leaf get contiguous ids; depth = parent + 1; a child at depth == max_depth is
//   terminal. Pruning at expansion (on the children's rewards, per leaf): minmax keeps the best reward
//   (lowest index on ties) and the worst among the others (lowest index on ties); topk keeps the k best
//   (stable: lower index wins ties); threshold drops reward < tau (absolute) or < best - tau (relative).
//   Pruned children are created with kPrunedExpand (so viewers can show them) and are exhausted.
// * backup(leaves, values): for every node from leaf to root: inflight -= 1, visits += 1,
//   value_sum += value. cancel(leaves): inflight -= 1 only. Both first check (exactly, on integers) that
//   no inflight count would go below zero and raise without changing anything otherwise.
// * prune_subtrees(roots, tau, min_visits): marks kPrunedSubtree on every non-root node reachable without
//   crossing a pruned node with visits >= min_visits and mean value < tau; returns how many.
//
// Threading: every public method takes the forest's mutex, so concurrent Python threads are safe; the
// binding releases the GIL around the long calls.
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace sphere {

enum Flag : uint8_t {
  kTerminal = 1,
  kExpanded = 2,
  kPrunedExpand = 4,
  kPrunedSubtree = 8,
  kExhausted = 16,
};
constexpr uint8_t kPruned = kPrunedExpand | kPrunedSubtree;

enum class Rule : int32_t { kUct = 0, kPuct = 1 };
enum class Fpu : int32_t { kParent = 0, kValue = 1, kInf = 2, kConst = 3 };
enum class Pruning : int32_t { kNone = 0, kMinMax = 1, kTopK = 2, kThreshold = 3 };
enum class PathBy : int32_t { kVisits = 0, kValue = 1, kReward = 2 };

struct Config {
  Rule rule = Rule::kPuct;
  double c = 1.25;
  double virtual_loss = 1.0;
  double virtual_loss_value = 0.0;
  Fpu fpu = Fpu::kParent;
  double fpu_value = 0.0;
  double fpu_reduction = 0.0;
  bool q_norm = false;
  int32_t max_depth = 12;
  Pruning pruning = Pruning::kNone;
  int32_t prune_k = 2;
  double prune_tau = 0.0;
  bool prune_relative = false;
};

// Allocator for the per-node arrays: blocks of 2 MiB and more are 2 MiB-aligned and marked for transparent
// huge pages (madvise), so descending many trees does not pay a page walk per node (costly in VMs).
template <class T>
struct HugePageAlloc {
  using value_type = T;
  HugePageAlloc() = default;
  template <class U>
  HugePageAlloc(const HugePageAlloc<U>&) {}  // NOLINT: allocator rebind
  T* allocate(size_t n) {
    constexpr size_t kHuge = size_t{1} << 21;
    size_t bytes = n * sizeof(T);
    void* p;
    if (bytes >= kHuge) {
      bytes = (bytes + kHuge - 1) / kHuge * kHuge;
      p = std::aligned_alloc(kHuge, bytes);
#ifdef MADV_HUGEPAGE
      if (p) madvise(p, bytes, MADV_HUGEPAGE);
#endif
    } else {
      p = std::malloc(bytes ? bytes : 1);
    }
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) noexcept { std::free(p); }
  template <class U>
  bool operator==(const HugePageAlloc<U>&) const { return true; }
  template <class U>
  bool operator!=(const HugePageAlloc<U>&) const { return false; }
};
template <class T>
using NodeVec = std::vector<T, HugePageAlloc<T>>;

struct Hot {
  double value_sum;
  int32_t first_child;
  int32_t visits;
  int32_t inflight;
  float prior;
  float init_value;
  uint16_t num_children;
  uint8_t flags;
  uint8_t pad;
};
// Which child-scoring path this build compiled: "sse2" (x86-64) or "scalar" (other targets, or -DSPHERE_NO_SIMD).
// Exposed as sphere._core.SIMD, so a test can tell which path it checked.
const char* simd_path();

constexpr int kHotBytes = static_cast<int>(sizeof(Hot));
static_assert(sizeof(Hot) == 32, "hot node record must stay 32 bytes (two per 64-byte cache line)");
constexpr int kBytesPerNode =
    kHotBytes + static_cast<int>(sizeof(int32_t) + sizeof(int64_t) + sizeof(int32_t) + sizeof(float) + sizeof(int16_t));
static_assert(kBytesPerNode <= 64, "node record (hot + cold) must stay within 64 bytes");
constexpr int32_t kMaxChildren = 65535;

struct Stats {
  int64_t nodes = 0, trees = 0, expanded = 0, terminal = 0, pruned_at_expansion = 0;
  int64_t pruned_subtrees = 0, collisions = 0, exhausted_roots = 0, inflight_roots = 0;
  std::vector<int64_t> depth_histogram;
};

class Forest {
 public:
  explicit Forest(const Config& cfg);

  const Config& config() const { return cfg_; }
  int64_t num_nodes() const { return static_cast<int64_t>(parent_.size()); }
  int64_t num_trees() const { return static_cast<int64_t>(roots_.size()); }

  void reserve(int64_t nodes);
  void reset();

  // payloads: int64[T] -> out int32[T] root ids.
  void add_roots(const int64_t* payloads, int64_t t, int32_t* out);
  // roots int32[T], k >= 0 -> tree_idx int32[M], leaves int32[M]; collisions int32[T] (written).
  void select(const int32_t* roots, int64_t t, int32_t k, std::vector<int32_t>& tree_idx,
              std::vector<int32_t>& leaves, int32_t* collisions);
  // nodes int32[M] -> offsets int64[M+1] (written), path ids root first (appended).
  void paths(const int32_t* nodes, int64_t m, int64_t* offsets, std::vector<int32_t>& out);
  // per leaf i: counts[i] children, per child: priors, payloads, rewards, values, terminal -> ids int32[C].
  void expand(const int32_t* leaves, const int32_t* counts, int64_t m, const float* priors,
              const int64_t* payloads, const float* rewards, const float* values, const uint8_t* terminal,
              int64_t c, int32_t* out);
  void backup(const int32_t* leaves, const float* values, int64_t m);
  void cancel(const int32_t* leaves, int64_t m);
  int64_t prune_subtrees(const int32_t* roots, int64_t t, double tau, int32_t min_visits);
  // Read-only. nodes int32[M] (each expanded) -> offsets int64[M+1] (written), per node its children's
  // selection scores in child order (appended); see "child_scores" above.
  void child_scores(const int32_t* nodes, int64_t m, int64_t* offsets, std::vector<double>& out);

  std::vector<int32_t> best_path(int32_t root, PathBy by);
  std::vector<int32_t> worst_path(int32_t root);
  void terminals(const int32_t* roots, int64_t t, int64_t* offsets, std::vector<int32_t>& nodes,
                 std::vector<float>& values);

  // Per-node getters (nodes int32[M] -> out[M]).
  void get_payload(const int32_t* n, int64_t m, int64_t* out);
  void get_reward(const int32_t* n, int64_t m, float* out);
  void get_prior(const int32_t* n, int64_t m, float* out);
  void get_visits(const int32_t* n, int64_t m, int32_t* out);
  void get_inflight(const int32_t* n, int64_t m, int32_t* out);
  void get_value(const int32_t* n, int64_t m, float* out);
  void get_depth(const int32_t* n, int64_t m, int32_t* out);
  void get_parent(const int32_t* n, int64_t m, int32_t* out);
  void get_flags(const int32_t* n, int64_t m, uint8_t* out);

  Stats stats();
  // Empty string when every invariant holds, else a description of the first broken one.
  std::string validate();
  // One tree's node ids, ascending (= creation order; parents before children).
  std::vector<int32_t> tree_nodes(int32_t root);

  // Raw storage for zero-copy snapshots (invalid after the next growth or reset).
  const NodeVec<Hot>& hot() const { return hot_; }
  const NodeVec<int32_t>& parent() const { return parent_; }
  const NodeVec<int64_t>& payload() const { return payload_; }
  const NodeVec<int32_t>& tree() const { return tree_; }
  const NodeVec<float>& reward() const { return reward_; }
  const NodeVec<int16_t>& depth() const { return depth_; }
  const std::vector<int32_t>& roots() const { return roots_; }
  const std::vector<int64_t>& tree_collisions() const { return tree_collisions_; }

 private:
  void reserve_locked(size_t n);
  void check_node(int32_t id, const char* arg, int64_t i) const;
  void check_root(int32_t id, const char* arg, int64_t i) const;
  int32_t new_node(int32_t parent, int64_t payload, float prior, float reward, float value, int32_t tree,
                   int16_t depth);
  void mark_exhausted(int32_t n);
  double mean_or_init(int32_t n) const;
  double node_value(int32_t n) const;
  template <Rule R, Fpu F, bool Norm, class Sink>
  void score_children(int32_t n, int32_t t, double inflight, Sink&& sink) const;
  template <Rule R, Fpu F, bool Norm>
  int32_t pick_child(int32_t n, int32_t t) const;
  template <Rule R, Fpu F>
  void child_scores_rf(const int32_t* nodes, int64_t m, int64_t* offsets, std::vector<double>& out) const;
  template <Rule R, Fpu F, bool QNorm>
  void descend(const int32_t* roots, int64_t t, int32_t k, std::vector<int32_t>& tree_idx,
               std::vector<int32_t>& leaves, int32_t* collisions);
  void release(const int32_t* leaves, int64_t m, const char* arg);
  void apply_pruning(int32_t first, int32_t count);
  void collect(int32_t root, std::vector<int32_t>& out, bool skip_pruned) const;
  std::string validate_locked() const;

  Config cfg_;
  std::mutex mu_;
  // per node
  NodeVec<Hot> hot_;
  NodeVec<int32_t> parent_;
  NodeVec<int64_t> payload_;
  NodeVec<int32_t> tree_;
  NodeVec<float> reward_;
  NodeVec<int16_t> depth_;
  // per tree
  std::vector<int32_t> roots_;
  std::vector<double> qmin_, qmax_;
  std::vector<int64_t> tree_collisions_;
  std::vector<uint32_t> tree_mark_;  // duplicate-root check in select()
  uint32_t select_epoch_ = 0;
  int64_t pruned_subtrees_ = 0;
  // scratch
  std::vector<int32_t> scratch_;
};

}  // namespace sphere
