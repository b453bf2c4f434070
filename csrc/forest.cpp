// Implementation of sphere::Forest; semantics and layout are documented in forest.hpp.
// Every mutation validates its whole input first, so a bad call raises without changing the forest.
#include "forest.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <type_traits>

#if (defined(__SSE2__) || defined(_M_X64)) && !defined(SPHERE_NO_SIMD)
#include <emmintrin.h>
#define SPHERE_SSE2 1
#else
#define SPHERE_SSE2 0
#endif
#if defined(__GNUC__) || defined(__clang__)
#define SPHERE_ALWAYS_INLINE __attribute__((always_inline)) inline
#elif defined(_MSC_VER)
#define SPHERE_ALWAYS_INLINE __forceinline
#else
#define SPHERE_ALWAYS_INLINE inline
#endif

namespace sphere {

const char* simd_path() { return SPHERE_SSE2 ? "sse2" : "scalar"; }

namespace {

std::string at(const char* arg, int64_t i) { return std::string(arg) + "[" + std::to_string(i) + "]"; }

constexpr double kInf = std::numeric_limits<double>::infinity();

}  // namespace

Forest::Forest(const Config& cfg) : cfg_(cfg) {
  if (cfg_.max_depth < 1 || cfg_.max_depth > 32767)
    throw std::invalid_argument("max_depth must be in [1, 32767], got " + std::to_string(cfg_.max_depth));
  if (cfg_.prune_k < 1) throw std::invalid_argument("prune_k must be >= 1, got " + std::to_string(cfg_.prune_k));
  if (!(cfg_.virtual_loss >= 0.0) || !std::isfinite(cfg_.virtual_loss))
    throw std::invalid_argument("virtual_loss must be a finite number >= 0");
  if (!std::isfinite(cfg_.c) || cfg_.c < 0.0) throw std::invalid_argument("c must be a finite number >= 0");
  if (!std::isfinite(cfg_.fpu_value) || !std::isfinite(cfg_.fpu_reduction) ||
      !std::isfinite(cfg_.virtual_loss_value) || !std::isfinite(cfg_.prune_tau))
    throw std::invalid_argument("fpu_value, fpu_reduction, virtual_loss_value and prune_tau must be finite");
}

void Forest::reserve(int64_t nodes) {
  std::lock_guard<std::mutex> lock(mu_);
  if (nodes < 0 || nodes > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("capacity must be in [0, 2^31-1], got " + std::to_string(nodes));
  reserve_locked(static_cast<size_t>(nodes));
}

void Forest::reserve_locked(size_t n) {
  hot_.reserve(n);
  parent_.reserve(n);
  payload_.reserve(n);
  tree_.reserve(n);
  reward_.reserve(n);
  depth_.reserve(n);
}

void Forest::reset() {
  std::lock_guard<std::mutex> lock(mu_);
  hot_.clear();
  parent_.clear();
  payload_.clear();
  tree_.clear();
  reward_.clear();
  depth_.clear();
  roots_.clear();
  qmin_.clear();
  qmax_.clear();
  tree_collisions_.clear();
  tree_mark_.clear();
  pruned_subtrees_ = 0;
}

void Forest::check_node(int32_t id, const char* arg, int64_t i) const {
  if (id < 0 || id >= num_nodes())
    throw std::out_of_range(at(arg, i) + "=" + std::to_string(id) + " is not a node id (forest has " +
                            std::to_string(num_nodes()) + " nodes)");
}

void Forest::check_root(int32_t id, const char* arg, int64_t i) const {
  check_node(id, arg, i);
  if (parent_[id] != -1)
    throw std::invalid_argument(at(arg, i) + "=" + std::to_string(id) + " is not a root (its parent is " +
                                std::to_string(parent_[id]) + ")");
}

int32_t Forest::new_node(int32_t parent, int64_t payload, float prior, float reward, float value, int32_t tree,
                         int16_t depth) {
  const auto id = static_cast<int32_t>(parent_.size());
  Hot h;
  h.value_sum = 0.0;
  h.first_child = -1;
  h.visits = 0;
  h.inflight = 0;
  h.prior = prior;
  h.init_value = value;
  h.num_children = 0;
  h.flags = 0;
  h.pad = 0;
  hot_.push_back(h);
  parent_.push_back(parent);
  payload_.push_back(payload);
  tree_.push_back(tree);
  reward_.push_back(reward);
  depth_.push_back(depth);
  return id;
}

void Forest::add_roots(const int64_t* payloads, int64_t t, int32_t* out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (num_nodes() + t > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("payloads: the forest would exceed 2^31-1 nodes");
  for (int64_t i = 0; i < t; ++i) {
    const auto tree = static_cast<int32_t>(roots_.size());
    const int32_t id = new_node(-1, payloads[i], 1.0f, 0.0f, std::numeric_limits<float>::quiet_NaN(), tree, 0);
    roots_.push_back(id);
    qmin_.push_back(kInf);
    qmax_.push_back(-kInf);
    tree_collisions_.push_back(0);
    out[i] = id;
  }
}

void Forest::mark_exhausted(int32_t n) {
  hot_[n].flags |= kExhausted;
  int32_t p = parent_[n];
  while (p >= 0 && !(hot_[p].flags & kExhausted)) {
    const int32_t first = hot_[p].first_child, end = first + hot_[p].num_children;
    for (int32_t ch = first; ch < end; ++ch)
      if (!(hot_[ch].flags & kExhausted)) return;
    hot_[p].flags |= kExhausted;
    p = parent_[p];
  }
}

double Forest::mean_or_init(int32_t n) const {
  if (hot_[n].visits > 0) return hot_[n].value_sum / static_cast<double>(hot_[n].visits);
  const float v = hot_[n].init_value;
  return std::isnan(v) ? 0.0 : static_cast<double>(v);
}

double Forest::node_value(int32_t n) const {
  if (hot_[n].visits > 0) return hot_[n].value_sum / static_cast<double>(hot_[n].visits);
  if (!std::isnan(hot_[n].init_value)) return static_cast<double>(hot_[n].init_value);
  return static_cast<double>(reward_[n]);
}

// Selection. pick_child() is instantiated per (rule, FPU mode, Q normalised or not), so the child loop
// carries no configuration branch; select() chooses the instance once per call (the q_norm instance per
// pick, since it depends on the tree's value range). On x86-64, two children are scored at once with SSE2
// packed doubles: each lane performs the same IEEE operations, in the same order, as the scalar formula
// documented in forest.hpp (and the reference), and IEEE add/mul/div/sqrt are correctly rounded per lane,
// so every score is bit-identical to the scalar one. Both branches of "visited ? Q : FPU" are computed
// (an unvisited lane divides by zero; that inf/NaN is discarded by a mask blend), and an exhausted child
// scores -inf, which the strict comparison against the initial -inf never takes. The argmax then reads the
// scores in child order, exactly like a scalar loop. Other targets (or -DSPHERE_NO_SIMD) use the scalar
// formula.
namespace {

struct PickArgs {
  double vl, lv, c, sq, lg, lo, span, fpu_q;
};

// Scalar score of one child (the reference formula); -inf when the child is exhausted.
template <Rule R, Fpu F, bool Norm>
inline double score1(const Hot& x, const PickArgs& p) {
  const double nvl = p.vl * static_cast<double>(x.inflight);
  const double neff = static_cast<double>(x.visits) + nvl;
  const bool visited = neff > 0.0;
  double q;
  if (visited) {
    q = (x.value_sum + nvl * p.lv) / neff;
  } else {
    q = (F == Fpu::kValue && !std::isnan(x.init_value)) ? static_cast<double>(x.init_value) : p.fpu_q;
  }
  if (Norm && std::isfinite(q)) q = (q - p.lo) / p.span;
  double s;
  if (R == Rule::kPuct) {
    s = q + p.c * static_cast<double>(x.prior) * p.sq / (1.0 + neff);
  } else {
    s = visited ? q + p.c * std::sqrt(p.lg / neff) : q;
  }
  return (x.flags & kExhausted) ? -kInf : s;
}

#if SPHERE_SSE2
inline __m128d blend(__m128d mask, __m128d a, __m128d b) {  // per lane: mask ? a : b
  return _mm_or_pd(_mm_and_pd(mask, a), _mm_andnot_pd(mask, b));
}

// score1() of children a (lane 0) and b (lane 1).
template <Rule R, Fpu F, bool Norm>
inline __m128d score2(const Hot& a, const Hot& b, const PickArgs& p) {
  static_assert(offsetof(Hot, inflight) == offsetof(Hot, visits) + 4 &&
                    offsetof(Hot, init_value) == offsetof(Hot, prior) + 4,
                "score2 loads visits+inflight and prior+init_value as pairs");
  // [a.visits, b.visits, a.inflight, b.inflight] and [a.prior, b.prior, a.init_value, b.init_value]
  auto load2 = [](const void* x, const void* y) {  // two unaligned 8-byte loads, interleaved by 32 bits
    return _mm_unpacklo_epi32(_mm_loadl_epi64(static_cast<const __m128i*>(x)),
                              _mm_loadl_epi64(static_cast<const __m128i*>(y)));
  };
  const __m128i vi = load2(&a.visits, &b.visits);
  const __m128 pf = _mm_castsi128_ps(load2(&a.prior, &b.prior));
  const __m128d visits = _mm_cvtepi32_pd(vi);
  const __m128d inflight = _mm_cvtepi32_pd(_mm_unpackhi_epi64(vi, vi));
  const __m128d nvl = _mm_mul_pd(_mm_set1_pd(p.vl), inflight);
  const __m128d neff = _mm_add_pd(visits, nvl);
  const __m128d visited = _mm_cmpgt_pd(neff, _mm_setzero_pd());
  const __m128d vs = _mm_setr_pd(a.value_sum, b.value_sum);
  __m128d q = _mm_div_pd(_mm_add_pd(vs, _mm_mul_pd(nvl, _mm_set1_pd(p.lv))), neff);
  __m128d fq = _mm_set1_pd(p.fpu_q);
  if (F == Fpu::kValue) {
    const __m128d init = _mm_cvtps_pd(_mm_movehl_ps(pf, pf));
    fq = blend(_mm_cmpunord_pd(init, init), fq, init);
  }
  q = blend(visited, q, fq);
  if (Norm) {
    const __m128d finite = _mm_cmplt_pd(_mm_andnot_pd(_mm_set1_pd(-0.0), q), _mm_set1_pd(kInf));
    q = blend(finite, _mm_div_pd(_mm_sub_pd(q, _mm_set1_pd(p.lo)), _mm_set1_pd(p.span)), q);
  }
  __m128d s;
  if (R == Rule::kPuct) {
    const __m128d prior = _mm_cvtps_pd(pf);
    s = _mm_add_pd(q, _mm_div_pd(_mm_mul_pd(_mm_mul_pd(_mm_set1_pd(p.c), prior), _mm_set1_pd(p.sq)),
                                 _mm_add_pd(_mm_set1_pd(1.0), neff)));
  } else {
    const __m128d explore = _mm_mul_pd(_mm_set1_pd(p.c), _mm_sqrt_pd(_mm_div_pd(_mm_set1_pd(p.lg), neff)));
    s = blend(visited, _mm_add_pd(q, explore), q);
  }
  const __m128d exhausted = _mm_castsi128_pd(_mm_set_epi64x(-static_cast<int64_t>((b.flags & kExhausted) != 0),
                                                            -static_cast<int64_t>((a.flags & kExhausted) != 0)));
  return blend(exhausted, _mm_set1_pd(-kInf), s);
}
#endif

}  // namespace

// The one scoring routine: the scores of n's children, in child order, as a descent through n computes
// them, given n's in-flight count `inflight` (the descent's own increment included). Each score goes to
// sink(s, ch) with the score in the low lane of s (SSE2) or as a double (scalar). pick_child() takes the
// argmax of these scores; child_scores() stores them, so the API reports exactly what select() compares.
template <Rule R, Fpu F, bool Norm, class Sink>
SPHERE_ALWAYS_INLINE void Forest::score_children(int32_t n, int32_t t, double inflight, Sink&& sink) const {
  const Hot* __restrict h = hot_.data();
  const int32_t first = h[n].first_child, end = first + h[n].num_children;
  PickArgs p;
  p.vl = cfg_.virtual_loss;
  p.lv = cfg_.virtual_loss_value;
  p.c = cfg_.c;
  const double p_eff = static_cast<double>(h[n].visits) + p.vl * inflight;
  p.sq = R == Rule::kPuct ? std::sqrt(p_eff) : 0.0;
  p.lg = R == Rule::kPuct ? 0.0 : std::log(std::max(p_eff, 1.0));
  p.lo = Norm ? qmin_[static_cast<size_t>(t)] : 0.0;
  p.span = Norm ? qmax_[static_cast<size_t>(t)] - qmin_[static_cast<size_t>(t)] : 1.0;
  // Q of an unvisited child (FPU); in "value" mode the child's own init_value overrides it when not NaN.
  switch (F) {
    case Fpu::kParent:
    case Fpu::kValue: p.fpu_q = mean_or_init(n) - cfg_.fpu_reduction; break;
    case Fpu::kInf: p.fpu_q = kInf; break;
    default: p.fpu_q = cfg_.fpu_value; break;
  }
  int32_t ch = first;
#if SPHERE_SSE2
  for (; ch + 1 < end; ch += 2) {  // an odd last child is scored in both lanes
    const __m128d s = score2<R, F, Norm>(h[ch], h[ch + 1], p);
    sink(s, ch);
    sink(_mm_unpackhi_pd(s, s), ch + 1);
  }
  if (ch < end) sink(score2<R, F, Norm>(h[ch], h[ch], p), ch);
#else
  for (; ch < end; ++ch) sink(score1<R, F, Norm>(h[ch], p), ch);
#endif
}

template <Rule R, Fpu F, bool Norm>
SPHERE_ALWAYS_INLINE int32_t Forest::pick_child(int32_t n, int32_t t) const {
  // Branch-free argmax in child order (the comparison is unpredictable); scores are never NaN or -inf for a
  // live child (finite values, FPU finite or +inf), so the first live child always beats the initial -inf.
  // n's in-flight count already includes this descent (descend() increments it before picking).
  int32_t best = -1;
#if SPHERE_SSE2
  // best = s > best_score ? i : best: comisd/seta for the index (false on NaN, like the scalar >), maxsd
  // for the score (maxsd(s, b) = s > b ? s : b, exactly).
  __m128d best_score = _mm_set_sd(-kInf);
  score_children<R, F, Norm>(n, t, static_cast<double>(hot_[n].inflight), [&](__m128d s, int32_t i) {
    const int32_t take = _mm_comigt_sd(s, best_score);
    best += (i - best) & -take;
    best_score = _mm_max_sd(s, best_score);
  });
#else
  double best_score = -kInf;
  score_children<R, F, Norm>(n, t, static_cast<double>(hot_[n].inflight), [&](double s, int32_t i) {
    const bool take = s > best_score;
    best = take ? i : best;
    best_score = take ? s : best_score;
  });
#endif
  if (best < 0) {  // defensive: a NaN score can only come from a broken invariant; fall back to the first
    const Hot* h = hot_.data();
    for (int32_t ch = h[n].first_child; ch < h[n].first_child + h[n].num_children && best < 0; ++ch)
      if (!(h[ch].flags & kExhausted)) best = ch;
  }
  return best;  // n is not exhausted, so some child is not either
}

namespace {
// Calls fn(rule, fpu) with the configuration's rule and FPU mode as compile-time constants
// (std::integral_constant), so select() and child_scores() pick their template instance in one place.
template <class Fn>
void with_rule_fpu(Rule rule, Fpu fpu, Fn&& fn) {
  auto by_fpu = [&](auto r) {
    switch (fpu) {
      case Fpu::kParent: fn(r, std::integral_constant<Fpu, Fpu::kParent>{}); break;
      case Fpu::kValue: fn(r, std::integral_constant<Fpu, Fpu::kValue>{}); break;
      case Fpu::kInf: fn(r, std::integral_constant<Fpu, Fpu::kInf>{}); break;
      default: fn(r, std::integral_constant<Fpu, Fpu::kConst>{}); break;
    }
  };
  if (rule == Rule::kPuct)
    by_fpu(std::integral_constant<Rule, Rule::kPuct>{});
  else
    by_fpu(std::integral_constant<Rule, Rule::kUct>{});
}
}  // namespace

// child_scores(): per node, the same instance select() would use (the q_norm one only when the tree's value
// range is non-empty), and the node's in-flight count plus the one a descent adds before it picks.
template <Rule R, Fpu F>
void Forest::child_scores_rf(const int32_t* nodes, int64_t m, int64_t* offsets, std::vector<double>& out) const {
  for (int64_t i = 0; i < m; ++i) {
    const int32_t n = nodes[i];
    const auto tr = static_cast<size_t>(tree_[n]);
    const double inflight = static_cast<double>(hot_[n].inflight) + 1.0;
#if SPHERE_SSE2
    auto store = [&](__m128d s, int32_t) { out.push_back(_mm_cvtsd_f64(s)); };
#else
    auto store = [&](double s, int32_t) { out.push_back(s); };
#endif
    if (cfg_.q_norm && qmax_[tr] > qmin_[tr])
      score_children<R, F, true>(n, tree_[n], inflight, store);
    else
      score_children<R, F, false>(n, tree_[n], inflight, store);
    offsets[i + 1] = static_cast<int64_t>(out.size());
  }
}

void Forest::child_scores(const int32_t* nodes, int64_t m, int64_t* offsets, std::vector<double>& out) {
  std::lock_guard<std::mutex> lock(mu_);
  size_t total = 0;
  for (int64_t i = 0; i < m; ++i) {
    check_node(nodes[i], "nodes", i);
    if (!(hot_[nodes[i]].flags & kExpanded))
      throw std::invalid_argument(at("nodes", i) + "=" + std::to_string(nodes[i]) +
                                  " is not expanded (it has no children to score)");
    total += hot_[nodes[i]].num_children;
  }
  out.clear();
  out.reserve(total);
  offsets[0] = 0;
  with_rule_fpu(cfg_.rule, cfg_.fpu, [&](auto r, auto f) {
    child_scores_rf<decltype(r)::value, decltype(f)::value>(nodes, m, offsets, out);
  });
}

// Descents of different trees are independent, so select() runs kLanes trees in lockstep, one tree level
// per lane per step, and prefetches the chosen child's children (and a root's children when a descent
// restarts there or the next group of trees is due), so that a cache miss in one lane overlaps the work of
// the others. The prefetch is unconditional and branch-free: on the bench workload (first 8 rounds, cache
// flushed between rounds) it raised selects/s from 7.7M to 13.3M, where the earlier loop over the child
// range behind an "expanded?" branch gained little. Within a tree, descents stay sequential (each sees
// the virtual loss of the previous ones), so the result equals running the trees one after another (the
// reference does that).
namespace {
constexpr int kLanes = 16;
inline void prefetch_children(const Hot* base, const Hot& h) {
  // The first three cache lines of the children (five 32-byte children span at most three) and the line
  // of the last child. Addresses are formed as integers: for an unexpanded node (first_child = -1, no
  // children) or past the array's end they point at memory the hint may not touch; prefetching never faults.
  const auto a = reinterpret_cast<std::uintptr_t>(base) +
                 static_cast<std::uintptr_t>(static_cast<std::intptr_t>(h.first_child) * kHotBytes);
  __builtin_prefetch(reinterpret_cast<const void*>(a));
  __builtin_prefetch(reinterpret_cast<const void*>(a + 64));
  __builtin_prefetch(reinterpret_cast<const void*>(a + 128));
  const auto last = a + static_cast<std::uintptr_t>(h.num_children) * kHotBytes - 1;
  __builtin_prefetch(reinterpret_cast<const void*>(last));
}
}  // namespace

template <Rule R, Fpu F, bool QNorm>
void Forest::descend(const int32_t* roots, int64_t t, int32_t k, std::vector<int32_t>& tree_idx,
                     std::vector<int32_t>& leaves, int32_t* collisions) {
  struct Lane {
    int32_t root, node, tree, done;
    bool active;
  };
  Lane lanes[kLanes];
  std::vector<int32_t> buf(static_cast<size_t>(kLanes) * static_cast<size_t>(k));
  Hot* const base = hot_.data();
  for (int64_t g0 = 0; g0 < t; g0 += kLanes) {
    const int gn = static_cast<int>(std::min<int64_t>(kLanes, t - g0));
    for (int64_t i = g0 + kLanes; i < std::min<int64_t>(g0 + 2 * kLanes, t); ++i)
      prefetch_children(base, base[roots[i]]);  // the next group's first level
    int active = 0;
    for (int l = 0; l < gn; ++l) {
      const int32_t root = roots[g0 + l];
      collisions[g0 + l] = 0;
      lanes[l] = Lane{root, root, tree_[root], 0, k > 0 && !(base[root].flags & kExhausted)};
      active += lanes[l].active;
    }
    while (active > 0) {
      for (int l = 0; l < gn; ++l) {
        Lane& ln = lanes[l];
        if (!ln.active) continue;
        const int32_t n = ln.node;
        if (base[n].flags & kExpanded) {  // one level down
          ++base[n].inflight;
          const auto tr = static_cast<size_t>(ln.tree);
          const int32_t ch = QNorm && qmax_[tr] > qmin_[tr] ? pick_child<R, F, true>(n, ln.tree)
                                                            : pick_child<R, F, false>(n, ln.tree);
          ln.node = ch;
          prefetch_children(base, base[ch]);
          continue;
        }
        if (base[n].inflight > 0) {  // collision: undo; the tree's state is exactly as before this descent,
          for (int32_t p = parent_[n]; p >= 0; p = parent_[p]) --base[p].inflight;  // so the rest collide too
          const int32_t rest = k - ln.done;
          collisions[g0 + l] += rest;
          tree_collisions_[static_cast<size_t>(ln.tree)] += rest;
          ln.active = false;
          --active;
          continue;
        }
        ++base[n].inflight;
        buf[static_cast<size_t>(l) * static_cast<size_t>(k) + static_cast<size_t>(ln.done)] = n;
        ln.node = ln.root;
        prefetch_children(base, base[ln.root]);
        if (++ln.done == k) {
          ln.active = false;
          --active;
        }
      }
    }
    for (int l = 0; l < gn; ++l)
      for (int32_t j = 0; j < lanes[l].done; ++j) {
        tree_idx.push_back(static_cast<int32_t>(g0 + l));
        leaves.push_back(buf[static_cast<size_t>(l) * static_cast<size_t>(k) + static_cast<size_t>(j)]);
      }
  }
}
void Forest::select(const int32_t* roots, int64_t t, int32_t k, std::vector<int32_t>& tree_idx,
                    std::vector<int32_t>& leaves, int32_t* collisions) {
  std::lock_guard<std::mutex> lock(mu_);
  if (k < 0) throw std::invalid_argument("k must be >= 0, got " + std::to_string(k));
  for (int64_t i = 0; i < t; ++i) check_root(roots[i], "roots", i);
  if (++select_epoch_ == 0) {  // wrapped: forget old marks
    std::fill(tree_mark_.begin(), tree_mark_.end(), 0u);
    select_epoch_ = 1;
  }
  tree_mark_.resize(roots_.size(), 0);
  for (int64_t i = 0; i < t; ++i) {
    const auto tr = static_cast<size_t>(tree_[roots[i]]);
    if (tree_mark_[tr] == select_epoch_)
      throw std::invalid_argument(at("roots", i) + "=" + std::to_string(roots[i]) + " appears more than once");
    tree_mark_[tr] = select_epoch_;
  }
  tree_idx.clear();
  leaves.clear();
  tree_idx.reserve(static_cast<size_t>(t) * static_cast<size_t>(k));
  leaves.reserve(static_cast<size_t>(t) * static_cast<size_t>(k));
  // One instance per configuration (see pick_child).
  with_rule_fpu(cfg_.rule, cfg_.fpu, [&](auto r, auto f) {
    if (cfg_.q_norm)
      descend<decltype(r)::value, decltype(f)::value, true>(roots, t, k, tree_idx, leaves, collisions);
    else
      descend<decltype(r)::value, decltype(f)::value, false>(roots, t, k, tree_idx, leaves, collisions);
  });
}


void Forest::paths(const int32_t* nodes, int64_t m, int64_t* offsets, std::vector<int32_t>& out) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t i = 0; i < m; ++i) check_node(nodes[i], "leaves", i);
  out.clear();
  offsets[0] = 0;
  for (int64_t i = 0; i < m; ++i) {
    const size_t start = out.size();
    for (int32_t n = nodes[i]; n >= 0; n = parent_[n]) out.push_back(n);
    std::reverse(out.begin() + static_cast<std::ptrdiff_t>(start), out.end());
    offsets[i + 1] = static_cast<int64_t>(out.size());
  }
}

void Forest::apply_pruning(int32_t first, int32_t count) {
  auto prune = [&](int32_t ch) { hot_[ch].flags |= kPrunedExpand | kExhausted; };
  const float* r = reward_.data() + first;
  switch (cfg_.pruning) {
    case Pruning::kNone: return;
    case Pruning::kMinMax: {
      if (count <= 2) return;
      int32_t best = 0;
      for (int32_t j = 1; j < count; ++j)
        if (r[j] > r[best]) best = j;
      int32_t worst = -1;
      for (int32_t j = 0; j < count; ++j)
        if (j != best && (worst < 0 || r[j] < r[worst])) worst = j;
      for (int32_t j = 0; j < count; ++j)
        if (j != best && j != worst) prune(first + j);
      return;
    }
    case Pruning::kTopK: {
      if (count <= cfg_.prune_k) return;
      scratch_.resize(static_cast<size_t>(count));
      std::iota(scratch_.begin(), scratch_.end(), 0);
      std::stable_sort(scratch_.begin(), scratch_.end(), [r](int32_t a, int32_t b) { return r[a] > r[b]; });
      for (int32_t j = cfg_.prune_k; j < count; ++j) prune(first + scratch_[static_cast<size_t>(j)]);
      return;
    }
    case Pruning::kThreshold: {
      double cut = cfg_.prune_tau;
      if (cfg_.prune_relative) {
        if (count == 0) return;
        double best = static_cast<double>(r[0]);
        for (int32_t j = 1; j < count; ++j) best = std::max(best, static_cast<double>(r[j]));
        cut = best - cfg_.prune_tau;
      }
      for (int32_t j = 0; j < count; ++j)
        if (static_cast<double>(r[j]) < cut) prune(first + j);
      return;
    }
  }
}

void Forest::expand(const int32_t* leaves, const int32_t* counts, int64_t m, const float* priors,
                    const int64_t* payloads, const float* rewards, const float* values, const uint8_t* terminal,
                    int64_t c, int32_t* out) {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t total = 0;
  for (int64_t i = 0; i < m; ++i) {
    check_node(leaves[i], "leaves", i);
    const int32_t n = leaves[i];
    if (hot_[n].flags & kExpanded)
      throw std::invalid_argument(at("leaves", i) + "=" + std::to_string(n) + " is already expanded");
    if (hot_[n].flags & kTerminal)
      throw std::invalid_argument(at("leaves", i) + "=" + std::to_string(n) + " is terminal; it cannot be expanded");
    if (counts[i] < 0 || counts[i] > kMaxChildren)
      throw std::invalid_argument(at("counts", i) + "=" + std::to_string(counts[i]) + " must be in [0, " +
                                  std::to_string(kMaxChildren) + "]");
    total += counts[i];
  }
  if (total != c)
    throw std::invalid_argument("counts sum to " + std::to_string(total) +
                                " but the per-child arrays (priors, payloads, rewards, values, terminal) have " +
                                std::to_string(c) + " entries");
  if (num_nodes() + c > std::numeric_limits<int32_t>::max())
    throw std::invalid_argument("expand: the forest would exceed 2^31-1 nodes");
  for (int64_t j = 0; j < c; ++j) {
    if (!std::isfinite(priors[j])) throw std::invalid_argument(at("priors", j) + " must be finite");
    if (!std::isfinite(rewards[j])) throw std::invalid_argument(at("rewards", j) + " must be finite");
    if (std::isinf(values[j])) throw std::invalid_argument(at("values", j) + " must be finite or NaN (none)");
  }
  if (m > 1) {
    scratch_.assign(leaves, leaves + m);
    std::sort(scratch_.begin(), scratch_.end());
    for (size_t i = 1; i < scratch_.size(); ++i)
      if (scratch_[i] == scratch_[i - 1])
        throw std::invalid_argument("leaves: node " + std::to_string(scratch_[i]) + " appears more than once");
  }
  const auto want = static_cast<size_t>(num_nodes() + c);
  if (parent_.capacity() < want) reserve_locked(std::max(want, parent_.capacity() * 2));
  // Grow every array once, then fill by index (no per-child push_back).
  const auto base = static_cast<size_t>(num_nodes());
  hot_.resize(want);
  parent_.resize(want);
  payload_.resize(want);
  tree_.resize(want);
  reward_.resize(want);
  depth_.resize(want);
  std::copy(payloads, payloads + c, payload_.begin() + static_cast<std::ptrdiff_t>(base));
  std::copy(rewards, rewards + c, reward_.begin() + static_cast<std::ptrdiff_t>(base));
  int64_t off = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int32_t leaf = leaves[i], cnt = counts[i];
    const auto d = static_cast<int16_t>(depth_[leaf] + 1);
    const int32_t tr = tree_[leaf];
    const int32_t first = static_cast<int32_t>(base + static_cast<size_t>(off));
    const uint8_t auto_terminal = d >= cfg_.max_depth ? (kTerminal | kExhausted) : 0;
    for (int32_t j = 0; j < cnt; ++j, ++off) {
      const auto id = static_cast<size_t>(base + static_cast<size_t>(off));
      Hot& h = hot_[id];
      h.value_sum = 0.0;
      h.first_child = -1;
      h.visits = 0;
      h.inflight = 0;
      h.prior = priors[off];
      h.init_value = values[off];
      h.num_children = 0;
      h.flags = terminal[off] ? static_cast<uint8_t>(kTerminal | kExhausted) : auto_terminal;
      h.pad = 0;
      parent_[id] = leaf;
      tree_[id] = tr;
      depth_[id] = d;
      out[off] = static_cast<int32_t>(id);
    }
    hot_[leaf].first_child = cnt > 0 ? first : -1;
    hot_[leaf].num_children = static_cast<uint16_t>(cnt);
    hot_[leaf].flags |= kExpanded;
    apply_pruning(first, cnt);
    bool all = true;
    for (int32_t ch = first; ch < first + cnt; ++ch)
      if (!(hot_[ch].flags & kExhausted)) {
        all = false;
        break;
      }
    if (all && !(hot_[leaf].flags & kExhausted)) mark_exhausted(leaf);
  }
}

void Forest::release(const int32_t* leaves, int64_t m, const char* arg) {
  for (int64_t i = 0; i < m; ++i) check_node(leaves[i], arg, i);
  // Decrement exactly on integers; on an underflow put everything back and raise.
  for (int64_t i = 0; i < m; ++i) {
    for (int32_t n = leaves[i]; n >= 0; n = parent_[n]) {
      if (hot_[n].inflight <= 0) {
        for (int32_t u = leaves[i]; u != n; u = parent_[u]) ++hot_[u].inflight;
        for (int64_t i2 = 0; i2 < i; ++i2)
          for (int32_t u = leaves[i2]; u >= 0; u = parent_[u]) ++hot_[u].inflight;
        throw std::invalid_argument(at(arg, i) + "=" + std::to_string(leaves[i]) +
                                    " has no select() in flight (node " + std::to_string(n) +
                                    " would have a negative in-flight count)");
      }
      --hot_[n].inflight;
    }
  }
}

void Forest::backup(const int32_t* leaves, const float* values, int64_t m) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t i = 0; i < m; ++i)
    if (!std::isfinite(values[i])) throw std::invalid_argument(at("values", i) + " must be finite");
  release(leaves, m, "leaves");
  for (int64_t i = 0; i < m; ++i) {
    const double v = static_cast<double>(values[i]);
    for (int32_t n = leaves[i]; n >= 0; n = parent_[n]) {
      ++hot_[n].visits;
      hot_[n].value_sum += v;
      if (cfg_.q_norm) {
        const double q = hot_[n].value_sum / static_cast<double>(hot_[n].visits);
        const auto t = static_cast<size_t>(tree_[n]);
        if (q < qmin_[t]) qmin_[t] = q;
        if (q > qmax_[t]) qmax_[t] = q;
      }
    }
  }
}

void Forest::cancel(const int32_t* leaves, int64_t m) {
  std::lock_guard<std::mutex> lock(mu_);
  release(leaves, m, "leaves");
}

int64_t Forest::prune_subtrees(const int32_t* roots, int64_t t, double tau, int32_t min_visits) {
  std::lock_guard<std::mutex> lock(mu_);
  if (std::isnan(tau)) throw std::invalid_argument("tau must not be NaN");
  if (min_visits < 0) throw std::invalid_argument("min_visits must be >= 0, got " + std::to_string(min_visits));
  for (int64_t i = 0; i < t; ++i) check_root(roots[i], "roots", i);
  const int32_t need = std::max(min_visits, 1);
  int64_t count = 0;
  std::vector<int32_t> stack;
  for (int64_t i = 0; i < t; ++i) {
    stack.assign(1, roots[i]);
    while (!stack.empty()) {
      const int32_t n = stack.back();
      stack.pop_back();
      if (hot_[n].flags & kPruned) continue;
      if (parent_[n] >= 0 && hot_[n].visits >= need && hot_[n].value_sum / static_cast<double>(hot_[n].visits) < tau) {
        hot_[n].flags |= kPrunedSubtree;
        ++count;
        if (!(hot_[n].flags & kExhausted)) mark_exhausted(n);
        continue;
      }
      for (int32_t ch = hot_[n].first_child + hot_[n].num_children - 1; ch >= hot_[n].first_child && ch >= 0; --ch)
        stack.push_back(ch);
    }
  }
  pruned_subtrees_ += count;
  return count;
}

std::vector<int32_t> Forest::best_path(int32_t root, PathBy by) {
  std::lock_guard<std::mutex> lock(mu_);
  check_node(root, "root", 0);
  std::vector<int32_t> out(1, root);
  int32_t n = root;
  while (true) {
    int32_t best = -1;
    double best_key = 0.0;
    for (int32_t ch = hot_[n].first_child; ch >= 0 && ch < hot_[n].first_child + hot_[n].num_children; ++ch) {
      if (hot_[ch].flags & kPruned) continue;
      double key;
      switch (by) {
        case PathBy::kVisits: key = static_cast<double>(hot_[ch].visits); break;
        case PathBy::kValue: key = node_value(ch); break;
        default: key = static_cast<double>(reward_[ch]); break;
      }
      if (best < 0 || key > best_key) {
        best = ch;
        best_key = key;
      }
    }
    if (best < 0) break;
    out.push_back(best);
    n = best;
  }
  return out;
}

std::vector<int32_t> Forest::worst_path(int32_t root) {
  std::lock_guard<std::mutex> lock(mu_);
  check_node(root, "root", 0);
  std::vector<int32_t> nodes;
  collect(root, nodes, true);
  std::sort(nodes.begin(), nodes.end());
  // reach[n - root]: n is not pruned and is terminal or has a child that reaches a terminal.
  const int32_t span = nodes.empty() ? 1 : nodes.back() - root + 1;
  std::vector<uint8_t> reach(static_cast<size_t>(span), 0);
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) {  // children have larger ids than parents
    const int32_t n = *it;
    if (hot_[n].flags & kTerminal) reach[static_cast<size_t>(n - root)] = 1;
    if (reach[static_cast<size_t>(n - root)] && n != root)
      reach[static_cast<size_t>(parent_[n] - root)] = 1;
  }
  std::vector<int32_t> out(1, root);
  int32_t n = root;
  while (true) {
    int32_t worst = -1;
    bool worst_reach = false;
    for (int32_t ch = hot_[n].first_child; ch >= 0 && ch < hot_[n].first_child + hot_[n].num_children; ++ch) {
      if (hot_[ch].flags & kPruned) continue;
      const bool rc = reach[static_cast<size_t>(ch - root)] != 0;
      if (worst < 0 || (rc && !worst_reach) || (rc == worst_reach && reward_[ch] < reward_[worst])) {
        worst = ch;
        worst_reach = rc;
      }
    }
    if (worst < 0) break;
    out.push_back(worst);
    n = worst;
  }
  return out;
}

void Forest::collect(int32_t root, std::vector<int32_t>& out, bool skip_pruned) const {
  out.clear();
  std::vector<int32_t> stack(1, root);
  while (!stack.empty()) {
    const int32_t n = stack.back();
    stack.pop_back();
    if (skip_pruned && (hot_[n].flags & kPruned)) continue;
    out.push_back(n);
    for (int32_t ch = hot_[n].first_child; ch >= 0 && ch < hot_[n].first_child + hot_[n].num_children; ++ch)
      stack.push_back(ch);
  }
}

void Forest::terminals(const int32_t* roots, int64_t t, int64_t* offsets, std::vector<int32_t>& nodes,
                       std::vector<float>& values) {
  std::lock_guard<std::mutex> lock(mu_);
  for (int64_t i = 0; i < t; ++i) check_root(roots[i], "roots", i);
  nodes.clear();
  values.clear();
  offsets[0] = 0;
  std::vector<int32_t> sub;
  for (int64_t i = 0; i < t; ++i) {
    collect(roots[i], sub, true);
    std::sort(sub.begin(), sub.end());
    for (int32_t n : sub)
      if (hot_[n].flags & kTerminal) {
        nodes.push_back(n);
        values.push_back(static_cast<float>(node_value(n)));
      }
    offsets[i + 1] = static_cast<int64_t>(nodes.size());
  }
}

std::vector<int32_t> Forest::tree_nodes(int32_t root) {
  std::lock_guard<std::mutex> lock(mu_);
  check_root(root, "root", 0);
  std::vector<int32_t> out;
  collect(root, out, false);
  std::sort(out.begin(), out.end());
  return out;
}

#define SPHERE_GETTER(NAME, T, EXPR)                                   \
  void Forest::NAME(const int32_t* nodes, int64_t m, T* out) {         \
    std::lock_guard<std::mutex> lock(mu_);                             \
    for (int64_t i = 0; i < m; ++i) check_node(nodes[i], "nodes", i); \
    for (int64_t i = 0; i < m; ++i) {                                  \
      const int32_t n = nodes[i];                                      \
      out[i] = EXPR;                                                   \
    }                                                                  \
  }
SPHERE_GETTER(get_payload, int64_t, payload_[n])
SPHERE_GETTER(get_reward, float, reward_[n])
SPHERE_GETTER(get_prior, float, hot_[n].prior)
SPHERE_GETTER(get_visits, int32_t, hot_[n].visits)
SPHERE_GETTER(get_inflight, int32_t, hot_[n].inflight)
SPHERE_GETTER(get_value, float, static_cast<float>(node_value(n)))
SPHERE_GETTER(get_depth, int32_t, depth_[n])
SPHERE_GETTER(get_parent, int32_t, parent_[n])
SPHERE_GETTER(get_flags, uint8_t, hot_[n].flags)
#undef SPHERE_GETTER

Stats Forest::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s;
  s.nodes = num_nodes();
  s.trees = num_trees();
  s.depth_histogram.assign(static_cast<size_t>(cfg_.max_depth) + 1, 0);
  for (int64_t n = 0; n < s.nodes; ++n) {
    const uint8_t f = hot_[static_cast<size_t>(n)].flags;
    s.expanded += (f & kExpanded) != 0;
    s.terminal += (f & kTerminal) != 0;
    s.pruned_at_expansion += (f & kPrunedExpand) != 0;
    ++s.depth_histogram[static_cast<size_t>(depth_[static_cast<size_t>(n)])];
  }
  s.pruned_subtrees = pruned_subtrees_;
  for (size_t t = 0; t < roots_.size(); ++t) {
    s.collisions += tree_collisions_[t];
    s.exhausted_roots += (hot_[static_cast<size_t>(roots_[t])].flags & kExhausted) != 0;
    s.inflight_roots += hot_[static_cast<size_t>(roots_[t])].inflight > 0;
  }
  return s;
}

std::string Forest::validate() {
  std::lock_guard<std::mutex> lock(mu_);
  return validate_locked();
}

std::string Forest::validate_locked() const {
  const int64_t n_nodes = num_nodes();
  const size_t nn = static_cast<size_t>(n_nodes);
  if (hot_.size() != nn || payload_.size() != nn || tree_.size() != nn || reward_.size() != nn ||
      depth_.size() != nn)
    return "per-node arrays have different lengths";
  if (qmin_.size() != roots_.size() || qmax_.size() != roots_.size() || tree_collisions_.size() != roots_.size())
    return "per-tree arrays have different lengths";
  for (size_t t = 0; t < roots_.size(); ++t) {
    const int32_t r = roots_[t];
    if (r < 0 || r >= n_nodes || parent_[static_cast<size_t>(r)] != -1 || tree_[static_cast<size_t>(r)] != static_cast<int32_t>(t))
      return "tree " + std::to_string(t) + ": root id " + std::to_string(r) + " is not a root of that tree";
    if (tree_collisions_[t] < 0) return "tree " + std::to_string(t) + ": negative collision count";
  }
  for (int32_t n = 0; n < static_cast<int32_t>(n_nodes); ++n) {
    const std::string id = "node " + std::to_string(n) + ": ";
    const uint8_t f = hot_[n].flags;
    const int32_t p = parent_[n];
    if (p < -1 || p >= n) return id + "parent " + std::to_string(p) + " is not an earlier node";
    if (p == -1) {
      const int32_t t = tree_[n];
      if (t < 0 || t >= num_trees() || roots_[static_cast<size_t>(t)] != n) return id + "a parentless node that is not a registered root";
      if (depth_[n] != 0) return id + "root depth is not 0";
      if (f & (kPrunedExpand | kPrunedSubtree | kTerminal)) return id + "a root is flagged pruned or terminal";
    } else {
      if (depth_[n] != depth_[p] + 1) return id + "depth is not parent depth + 1";
      if (tree_[n] != tree_[p]) return id + "tree differs from its parent's";
      if (n < hot_[p].first_child || n >= hot_[p].first_child + hot_[p].num_children) return id + "not within its parent's children";
      if (depth_[n] > cfg_.max_depth) return id + "deeper than max_depth";
      if (depth_[n] == cfg_.max_depth && !(f & kTerminal)) return id + "at max_depth but not terminal";
    }
    if (hot_[n].visits < 0) return id + "negative visits";
    if (hot_[n].inflight < 0) return id + "negative in-flight count";
    if (!std::isfinite(hot_[n].value_sum)) return id + "value_sum is not finite";
    if (hot_[n].visits == 0 && hot_[n].value_sum != 0.0) return id + "value_sum is non-zero without visits";
    if ((f & kTerminal) && (f & kExpanded)) return id + "terminal and expanded";
    if (!(f & kExpanded)) {
      if (hot_[n].num_children != 0 || hot_[n].first_child != -1) return id + "unexpanded but has children";
    } else if ((hot_[n].num_children > 0 && hot_[n].first_child <= n) ||
               (hot_[n].num_children == 0 && hot_[n].first_child != -1) ||
               static_cast<int64_t>(hot_[n].first_child) + hot_[n].num_children > n_nodes) {
      return id + "children range is invalid";
    }
    int64_t child_visits = 0, child_inflight = 0;
    bool all_exhausted = true;
    for (int32_t ch = hot_[n].first_child; ch >= 0 && ch < hot_[n].first_child + hot_[n].num_children; ++ch) {
      if (parent_[ch] != n) return id + "child " + std::to_string(ch) + " names another parent";
      child_visits += hot_[ch].visits;
      child_inflight += hot_[ch].inflight;
      all_exhausted = all_exhausted && (hot_[ch].flags & kExhausted);
    }
    if (child_visits > hot_[n].visits) return id + "children have more visits than the node";
    if (child_inflight > hot_[n].inflight) return id + "children have more in-flight descents than the node";
    const bool exhausted = (f & (kTerminal | kPruned)) || ((f & kExpanded) && all_exhausted);
    if (exhausted != ((f & kExhausted) != 0))
      return id + (exhausted ? "should be exhausted but is not flagged" : "flagged exhausted but is not");
  }
  return "";
}

}  // namespace sphere
