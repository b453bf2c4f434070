// Implementation of sphere::Forest; semantics and layout are documented in forest.hpp.
// Every mutation validates its whole input first, so a bad call raises without changing the forest.
#include "forest.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>

namespace sphere {

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
  const auto n = static_cast<size_t>(nodes);
  value_sum_.reserve(n);
  parent_.reserve(n);
  first_child_.reserve(n);
  num_children_.reserve(n);
  visits_.reserve(n);
  inflight_.reserve(n);
  prior_.reserve(n);
  init_value_.reserve(n);
  flags_.reserve(n);
  payload_.reserve(n);
  tree_.reserve(n);
  reward_.reserve(n);
  depth_.reserve(n);
}

void Forest::reset() {
  std::lock_guard<std::mutex> lock(mu_);
  value_sum_.clear();
  parent_.clear();
  first_child_.clear();
  num_children_.clear();
  visits_.clear();
  inflight_.clear();
  prior_.clear();
  init_value_.clear();
  flags_.clear();
  payload_.clear();
  tree_.clear();
  reward_.clear();
  depth_.clear();
  roots_.clear();
  qmin_.clear();
  qmax_.clear();
  tree_collisions_.clear();
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
  value_sum_.push_back(0.0);
  parent_.push_back(parent);
  first_child_.push_back(-1);
  num_children_.push_back(0);
  visits_.push_back(0);
  inflight_.push_back(0);
  prior_.push_back(prior);
  init_value_.push_back(value);
  flags_.push_back(0);
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
  flags_[n] |= kExhausted;
  int32_t p = parent_[n];
  while (p >= 0 && !(flags_[p] & kExhausted)) {
    const int32_t first = first_child_[p], end = first + num_children_[p];
    for (int32_t ch = first; ch < end; ++ch)
      if (!(flags_[ch] & kExhausted)) return;
    flags_[p] |= kExhausted;
    p = parent_[p];
  }
}

double Forest::mean_or_init(int32_t n) const {
  if (visits_[n] > 0) return value_sum_[n] / static_cast<double>(visits_[n]);
  const float v = init_value_[n];
  return std::isnan(v) ? 0.0 : static_cast<double>(v);
}

double Forest::node_value(int32_t n) const {
  if (visits_[n] > 0) return value_sum_[n] / static_cast<double>(visits_[n]);
  if (!std::isnan(init_value_[n])) return static_cast<double>(init_value_[n]);
  return static_cast<double>(reward_[n]);
}

int32_t Forest::pick_child(int32_t n) {
  const int32_t first = first_child_[n], end = first + num_children_[n];
  const double vl = cfg_.virtual_loss, c = cfg_.c, lv = cfg_.virtual_loss_value;
  const double p_eff = static_cast<double>(visits_[n]) + vl * static_cast<double>(inflight_[n]);
  const bool puct = cfg_.rule == Rule::kPuct;
  const double sq = puct ? std::sqrt(p_eff) : 0.0;
  const double lg = puct ? 0.0 : std::log(std::max(p_eff, 1.0));
  const int32_t t = tree_[n];
  const bool norm = cfg_.q_norm && qmax_[t] > qmin_[t];
  const double lo = qmin_[t], span = qmax_[t] - qmin_[t];
  double parent_fpu = 0.0;
  if (cfg_.fpu == Fpu::kParent || cfg_.fpu == Fpu::kValue) parent_fpu = mean_or_init(n) - cfg_.fpu_reduction;
  int32_t best = -1;
  double best_score = 0.0;
  for (int32_t ch = first; ch < end; ++ch) {
    if (flags_[ch] & kExhausted) continue;
    const double nvl = vl * static_cast<double>(inflight_[ch]);
    const double neff = static_cast<double>(visits_[ch]) + nvl;
    const bool visited = neff > 0.0;
    double q;
    if (visited) {
      q = (value_sum_[ch] + nvl * lv) / neff;
    } else {
      switch (cfg_.fpu) {
        case Fpu::kParent: q = parent_fpu; break;
        case Fpu::kValue: q = std::isnan(init_value_[ch]) ? parent_fpu : static_cast<double>(init_value_[ch]); break;
        case Fpu::kInf: q = kInf; break;
        default: q = cfg_.fpu_value; break;
      }
    }
    if (norm && std::isfinite(q)) q = (q - lo) / span;
    double s;
    if (puct) {
      s = q + c * static_cast<double>(prior_[ch]) * sq / (1.0 + neff);
    } else {
      s = visited ? q + c * std::sqrt(lg / neff) : q;
    }
    if (best < 0 || s > best_score) {
      best = ch;
      best_score = s;
    }
  }
  return best;  // n is not exhausted, so some child is not either
}

// One descent from root; returns false on a collision (inflight restored).
bool Forest::descend(int32_t root, std::vector<int32_t>& path) {
  (void)path;
  int32_t n = root;
  while (flags_[n] & kExpanded) {
    ++inflight_[n];
    n = pick_child(n);
  }
  if (inflight_[n] > 0) {
    for (int32_t p = parent_[n]; p >= 0; p = parent_[p]) --inflight_[p];
    return false;
  }
  ++inflight_[n];
  path.assign(1, n);
  return true;
}

void Forest::select(const int32_t* roots, int64_t t, int32_t k, std::vector<int32_t>& tree_idx,
                    std::vector<int32_t>& leaves, int32_t* collisions) {
  std::lock_guard<std::mutex> lock(mu_);
  if (k < 0) throw std::invalid_argument("k must be >= 0, got " + std::to_string(k));
  for (int64_t i = 0; i < t; ++i) check_root(roots[i], "roots", i);
  tree_idx.clear();
  leaves.clear();
  tree_idx.reserve(static_cast<size_t>(t) * static_cast<size_t>(k));
  leaves.reserve(static_cast<size_t>(t) * static_cast<size_t>(k));
  for (int64_t i = 0; i < t; ++i) {
    collisions[i] = 0;
    const int32_t root = roots[i];
    for (int32_t j = 0; j < k; ++j) {
      if (flags_[root] & kExhausted) break;
      if (descend(root, path_)) {
        tree_idx.push_back(static_cast<int32_t>(i));
        leaves.push_back(path_[0]);
      } else {
        // The state is exactly as before this descent, so the remaining ones would collide too.
        const int32_t rest = k - j;
        collisions[i] += rest;
        tree_collisions_[static_cast<size_t>(tree_[root])] += rest;
        break;
      }
    }
  }
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
  auto prune = [&](int32_t ch) { flags_[ch] |= kPrunedExpand | kExhausted; };
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
    if (flags_[n] & kExpanded)
      throw std::invalid_argument(at("leaves", i) + "=" + std::to_string(n) + " is already expanded");
    if (flags_[n] & kTerminal)
      throw std::invalid_argument(at("leaves", i) + "=" + std::to_string(n) + " is terminal; it cannot be expanded");
    if (counts[i] < 0)
      throw std::invalid_argument(at("counts", i) + "=" + std::to_string(counts[i]) + " must be >= 0");
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
  if (parent_.capacity() < want) {
    size_t cap = std::max(want, parent_.capacity() * 2);
    value_sum_.reserve(cap);
    parent_.reserve(cap);
    first_child_.reserve(cap);
    num_children_.reserve(cap);
    visits_.reserve(cap);
    inflight_.reserve(cap);
    prior_.reserve(cap);
    init_value_.reserve(cap);
    flags_.reserve(cap);
    payload_.reserve(cap);
    tree_.reserve(cap);
    reward_.reserve(cap);
    depth_.reserve(cap);
  }
  int64_t off = 0;
  for (int64_t i = 0; i < m; ++i) {
    const int32_t leaf = leaves[i], cnt = counts[i];
    const auto d = static_cast<int16_t>(depth_[leaf] + 1);
    const int32_t first = static_cast<int32_t>(num_nodes());
    for (int32_t j = 0; j < cnt; ++j, ++off) {
      const int32_t id = new_node(leaf, payloads[off], priors[off], rewards[off], values[off], tree_[leaf], d);
      if (terminal[off] || d >= cfg_.max_depth) flags_[id] |= kTerminal | kExhausted;
      out[off] = id;
    }
    first_child_[leaf] = cnt > 0 ? first : -1;
    num_children_[leaf] = cnt;
    flags_[leaf] |= kExpanded;
    apply_pruning(first, cnt);
    bool all = true;
    for (int32_t ch = first; ch < first + cnt; ++ch)
      if (!(flags_[ch] & kExhausted)) {
        all = false;
        break;
      }
    if (all && !(flags_[leaf] & kExhausted)) mark_exhausted(leaf);
  }
}

void Forest::release(const int32_t* leaves, int64_t m, const char* arg) {
  for (int64_t i = 0; i < m; ++i) check_node(leaves[i], arg, i);
  // Decrement exactly on integers; on an underflow put everything back and raise.
  for (int64_t i = 0; i < m; ++i) {
    for (int32_t n = leaves[i]; n >= 0; n = parent_[n]) {
      if (inflight_[n] <= 0) {
        for (int32_t u = leaves[i]; u != n; u = parent_[u]) ++inflight_[u];
        for (int64_t i2 = 0; i2 < i; ++i2)
          for (int32_t u = leaves[i2]; u >= 0; u = parent_[u]) ++inflight_[u];
        throw std::invalid_argument(at(arg, i) + "=" + std::to_string(leaves[i]) +
                                    " has no select() in flight (node " + std::to_string(n) +
                                    " would have a negative in-flight count)");
      }
      --inflight_[n];
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
      ++visits_[n];
      value_sum_[n] += v;
      if (cfg_.q_norm) {
        const double q = value_sum_[n] / static_cast<double>(visits_[n]);
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
      if (flags_[n] & kPruned) continue;
      if (parent_[n] >= 0 && visits_[n] >= need && value_sum_[n] / static_cast<double>(visits_[n]) < tau) {
        flags_[n] |= kPrunedSubtree;
        ++count;
        if (!(flags_[n] & kExhausted)) mark_exhausted(n);
        continue;
      }
      for (int32_t ch = first_child_[n] + num_children_[n] - 1; ch >= first_child_[n] && ch >= 0; --ch)
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
    for (int32_t ch = first_child_[n]; ch >= 0 && ch < first_child_[n] + num_children_[n]; ++ch) {
      if (flags_[ch] & kPruned) continue;
      double key;
      switch (by) {
        case PathBy::kVisits: key = static_cast<double>(visits_[ch]); break;
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
    if (flags_[n] & kTerminal) reach[static_cast<size_t>(n - root)] = 1;
    if (reach[static_cast<size_t>(n - root)] && n != root)
      reach[static_cast<size_t>(parent_[n] - root)] = 1;
  }
  std::vector<int32_t> out(1, root);
  int32_t n = root;
  while (true) {
    int32_t worst = -1;
    bool worst_reach = false;
    for (int32_t ch = first_child_[n]; ch >= 0 && ch < first_child_[n] + num_children_[n]; ++ch) {
      if (flags_[ch] & kPruned) continue;
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
    if (skip_pruned && (flags_[n] & kPruned)) continue;
    out.push_back(n);
    for (int32_t ch = first_child_[n]; ch >= 0 && ch < first_child_[n] + num_children_[n]; ++ch)
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
      if (flags_[n] & kTerminal) {
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
SPHERE_GETTER(get_prior, float, prior_[n])
SPHERE_GETTER(get_visits, int32_t, visits_[n])
SPHERE_GETTER(get_inflight, int32_t, inflight_[n])
SPHERE_GETTER(get_value, float, static_cast<float>(node_value(n)))
SPHERE_GETTER(get_depth, int32_t, depth_[n])
SPHERE_GETTER(get_parent, int32_t, parent_[n])
SPHERE_GETTER(get_flags, uint8_t, flags_[n])
#undef SPHERE_GETTER

Stats Forest::stats() {
  std::lock_guard<std::mutex> lock(mu_);
  Stats s;
  s.nodes = num_nodes();
  s.trees = num_trees();
  s.depth_histogram.assign(static_cast<size_t>(cfg_.max_depth) + 1, 0);
  for (int64_t n = 0; n < s.nodes; ++n) {
    const uint8_t f = flags_[static_cast<size_t>(n)];
    s.expanded += (f & kExpanded) != 0;
    s.terminal += (f & kTerminal) != 0;
    s.pruned_at_expansion += (f & kPrunedExpand) != 0;
    ++s.depth_histogram[static_cast<size_t>(depth_[static_cast<size_t>(n)])];
  }
  s.pruned_subtrees = pruned_subtrees_;
  for (size_t t = 0; t < roots_.size(); ++t) {
    s.collisions += tree_collisions_[t];
    s.exhausted_roots += (flags_[static_cast<size_t>(roots_[t])] & kExhausted) != 0;
    s.inflight_roots += inflight_[static_cast<size_t>(roots_[t])] > 0;
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
  if (value_sum_.size() != nn || first_child_.size() != nn || num_children_.size() != nn || visits_.size() != nn ||
      inflight_.size() != nn || prior_.size() != nn || init_value_.size() != nn || flags_.size() != nn ||
      payload_.size() != nn || tree_.size() != nn || reward_.size() != nn || depth_.size() != nn)
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
    const uint8_t f = flags_[n];
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
      if (n < first_child_[p] || n >= first_child_[p] + num_children_[p]) return id + "not within its parent's children";
      if (depth_[n] > cfg_.max_depth) return id + "deeper than max_depth";
      if (depth_[n] == cfg_.max_depth && !(f & kTerminal)) return id + "at max_depth but not terminal";
    }
    if (visits_[n] < 0) return id + "negative visits";
    if (inflight_[n] < 0) return id + "negative in-flight count";
    if (!std::isfinite(value_sum_[n])) return id + "value_sum is not finite";
    if (visits_[n] == 0 && value_sum_[n] != 0.0) return id + "value_sum is non-zero without visits";
    if ((f & kTerminal) && (f & kExpanded)) return id + "terminal and expanded";
    if (!(f & kExpanded)) {
      if (num_children_[n] != 0 || first_child_[n] != -1) return id + "unexpanded but has children";
    } else if (num_children_[n] < 0 || (num_children_[n] > 0 && first_child_[n] <= n) ||
               (num_children_[n] == 0 && first_child_[n] != -1) ||
               static_cast<int64_t>(first_child_[n]) + num_children_[n] > n_nodes) {
      return id + "children range is invalid";
    }
    int64_t child_visits = 0, child_inflight = 0;
    bool all_exhausted = true;
    for (int32_t ch = first_child_[n]; ch >= 0 && ch < first_child_[n] + num_children_[n]; ++ch) {
      if (parent_[ch] != n) return id + "child " + std::to_string(ch) + " names another parent";
      child_visits += visits_[ch];
      child_inflight += inflight_[ch];
      all_exhausted = all_exhausted && (flags_[ch] & kExhausted);
    }
    if (child_visits > visits_[n]) return id + "children have more visits than the node";
    if (child_inflight > inflight_[n]) return id + "children have more in-flight descents than the node";
    const bool exhausted = (f & (kTerminal | kPruned)) || ((f & kExpanded) && all_exhausted);
    if (exhausted != ((f & kExhausted) != 0))
      return id + (exhausted ? "should be exhausted but is not flagged" : "flagged exhausted but is not");
  }
  return "";
}

}  // namespace sphere
