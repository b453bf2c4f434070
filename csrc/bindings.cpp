// pybind11 layer over sphere::Forest: numpy arrays in and out, exact dtypes (the Python wrapper in
// sphere/engine/__init__.py converts), 1-D checks, GIL released around every call that walks the tree.
// C++ exceptions map to Python: std::invalid_argument -> ValueError, std::out_of_range -> IndexError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <string>
#include <vector>

#include "forest.hpp"

namespace py = pybind11;
using sphere::Forest;

namespace {

template <class T>
using arr = py::array_t<T, py::array::c_style>;

template <class T>
int64_t len1d(const arr<T>& a, const char* name) {
  if (a.ndim() != 1)
    throw py::value_error(std::string(name) + " must be a 1-D array, got " + std::to_string(a.ndim()) + "-D");
  return static_cast<int64_t>(a.shape(0));
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
  py::array_t<T> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

// A per-node CSR result (offsets int64[m+1], values T[]): `name` is the input's name in errors; fill(ids, m,
// offsets, values) runs without the GIL. Used by paths() and child_scores().
template <class T, class Fill>
py::tuple csr(const arr<int32_t>& ids, const char* name, Fill&& fill) {
  const int64_t m = len1d(ids, name);
  py::array_t<int64_t> off(static_cast<py::ssize_t>(m + 1));
  std::vector<T> values;
  const int32_t* ip = ids.data();
  int64_t* op = off.mutable_data();
  {
    py::gil_scoped_release rel;
    fill(ip, m, op, values);
  }
  return py::make_tuple(off, to_array(values));
}

template <class T, class A>
py::array view(const std::vector<T, A>& v, const py::object& owner) {
  // Zero-copy, read-only; `owner` keeps the forest alive. Invalid after the forest grows or resets.
  py::array a(py::dtype::of<T>(), {static_cast<py::ssize_t>(v.size())}, {static_cast<py::ssize_t>(sizeof(T))},
              v.empty() ? nullptr : v.data(), owner);
  a.attr("flags").attr("writeable") = false;
  return a;
}

template <class T>
py::array hot_view(const sphere::NodeVec<sphere::Hot>& v, size_t offset, const py::object& owner) {
  // A strided zero-copy view of one field of the hot records.
  if (v.empty()) return py::array_t<T>(0);
  py::array a(py::dtype::of<T>(), {static_cast<py::ssize_t>(v.size())},
              {static_cast<py::ssize_t>(sizeof(sphere::Hot))},
              reinterpret_cast<const T*>(reinterpret_cast<const char*>(v.data()) + offset), owner);
  a.attr("flags").attr("writeable") = false;
  return a;
}

Forest* make_forest(int rule, double c, double vl, double vl_value, int fpu, double fpu_value,
                           double fpu_reduction, bool q_norm, int max_depth, int pruning, int prune_k,
                           double prune_tau, bool prune_relative) {
  if (rule < 0 || rule > 1) throw py::value_error("rule must be 0 (uct) or 1 (puct)");
  if (fpu < 0 || fpu > 3) throw py::value_error("fpu must be 0 (parent), 1 (value), 2 (inf) or 3 (const)");
  if (pruning < 0 || pruning > 3)
    throw py::value_error("pruning must be 0 (none), 1 (minmax), 2 (topk) or 3 (threshold)");
  sphere::Config cfg;
  cfg.rule = static_cast<sphere::Rule>(rule);
  cfg.c = c;
  cfg.virtual_loss = vl;
  cfg.virtual_loss_value = vl_value;
  cfg.fpu = static_cast<sphere::Fpu>(fpu);
  cfg.fpu_value = fpu_value;
  cfg.fpu_reduction = fpu_reduction;
  cfg.q_norm = q_norm;
  cfg.max_depth = max_depth;
  cfg.pruning = static_cast<sphere::Pruning>(pruning);
  cfg.prune_k = prune_k;
  cfg.prune_tau = prune_tau;
  cfg.prune_relative = prune_relative;
  return new Forest(cfg);
}

#define SPHERE_BIND_GETTER(NAME, T)                                        \
  .def(#NAME, [](Forest& f, const arr<int32_t>& nodes) {                  \
    const int64_t m = len1d(nodes, "nodes");                              \
    py::array_t<T> out(static_cast<py::ssize_t>(m));                      \
    const int32_t* np_ = nodes.data();                                     \
    T* op = out.mutable_data();                                           \
    {                                                                     \
      py::gil_scoped_release rel;                                         \
      f.NAME(np_, m, op);                                                 \
    }                                                                     \
    return out;                                                           \
  })

}  // namespace

PYBIND11_MODULE(_core, mod) {
  mod.doc() = "sphere C++ tree engine: one arena of many MCTS trees (see csrc/forest.hpp)";
  mod.attr("BYTES_PER_NODE") = sphere::kBytesPerNode;
  mod.attr("HOT_BYTES_PER_NODE") = sphere::kHotBytes;
  mod.attr("SIMD") = sphere::simd_path();

  py::class_<Forest>(mod, "Forest")
      .def(py::init(&make_forest), py::arg("rule"), py::arg("c"), py::arg("virtual_loss"),
           py::arg("virtual_loss_value"), py::arg("fpu"), py::arg("fpu_value"), py::arg("fpu_reduction"),
           py::arg("q_norm"), py::arg("max_depth"), py::arg("pruning"), py::arg("prune_k"), py::arg("prune_tau"),
           py::arg("prune_relative"))
      .def_property_readonly("num_nodes", &Forest::num_nodes)
      .def_property_readonly("num_trees", &Forest::num_trees)
      .def("reserve", &Forest::reserve)
      .def("reset", &Forest::reset)
      .def("add_roots",
           [](Forest& f, const arr<int64_t>& payloads) {
             const int64_t t = len1d(payloads, "payloads");
             py::array_t<int32_t> out(static_cast<py::ssize_t>(t));
             f.add_roots(payloads.data(), t, out.mutable_data());
             return out;
           })
      .def("select",
           [](Forest& f, const arr<int32_t>& roots, int k) {
             const int64_t t = len1d(roots, "roots");
             py::array_t<int32_t> coll(static_cast<py::ssize_t>(t));
             std::vector<int32_t> tree_idx, leaves;
             const int32_t* rp = roots.data();
             int32_t* cp = coll.mutable_data();
             {
               py::gil_scoped_release rel;
               f.select(rp, t, k, tree_idx, leaves, cp);
             }
             return py::make_tuple(to_array(tree_idx), to_array(leaves), coll);
           })
      .def("paths",
           [](Forest& f, const arr<int32_t>& leaves) {
             return csr<int32_t>(leaves, "leaves", [&](const int32_t* lp, int64_t m, int64_t* op,
                                                       std::vector<int32_t>& out) { f.paths(lp, m, op, out); });
           })
      .def("expand",
           [](Forest& f, const arr<int32_t>& leaves, const arr<int32_t>& counts, const arr<float>& priors,
              const arr<int64_t>& payloads, const arr<float>& rewards, const arr<float>& values,
              const arr<uint8_t>& terminal) {
             const int64_t m = len1d(leaves, "leaves");
             if (len1d(counts, "counts") != m)
               throw py::value_error("counts must have one entry per leaf (" + std::to_string(m) + "), got " +
                                     std::to_string(counts.shape(0)));
             const int64_t c = len1d(priors, "priors");
             const char* names[] = {"payloads", "rewards", "values", "terminal"};
             const int64_t lens[] = {len1d(payloads, "payloads"), len1d(rewards, "rewards"),
                                     len1d(values, "values"), len1d(terminal, "terminal")};
             for (int i = 0; i < 4; ++i)
               if (lens[i] != c)
                 throw py::value_error(std::string(names[i]) + " must have one entry per child like priors (" +
                                       std::to_string(c) + "), got " + std::to_string(lens[i]));
             py::array_t<int32_t> out(static_cast<py::ssize_t>(c));
             const int32_t* lp = leaves.data();
             const int32_t* cp = counts.data();
             const float* pp = priors.data();
             const int64_t* yp = payloads.data();
             const float* rp = rewards.data();
             const float* vp = values.data();
             const uint8_t* tp = terminal.data();
             int32_t* op = out.mutable_data();
             {
               py::gil_scoped_release rel;
               f.expand(lp, cp, m, pp, yp, rp, vp, tp, c, op);
             }
             return out;
           })
      .def("backup",
           [](Forest& f, const arr<int32_t>& leaves, const arr<float>& values) {
             const int64_t m = len1d(leaves, "leaves");
             if (len1d(values, "values") != m)
               throw py::value_error("values must have one entry per leaf (" + std::to_string(m) + "), got " +
                                     std::to_string(values.shape(0)));
             const int32_t* lp = leaves.data();
             const float* vp = values.data();
             py::gil_scoped_release rel;
             f.backup(lp, vp, m);
           })
      .def("cancel",
           [](Forest& f, const arr<int32_t>& leaves) {
             const int64_t m = len1d(leaves, "leaves");
             const int32_t* lp = leaves.data();
             py::gil_scoped_release rel;
             f.cancel(lp, m);
           })
      .def("prune_subtrees",
           [](Forest& f, const arr<int32_t>& roots, double tau, int min_visits) {
             const int64_t t = len1d(roots, "roots");
             const int32_t* rp = roots.data();
             py::gil_scoped_release rel;
             return f.prune_subtrees(rp, t, tau, min_visits);
           })
      .def("child_scores",
           [](Forest& f, const arr<int32_t>& nodes) {
             return csr<double>(nodes, "nodes", [&](const int32_t* np_, int64_t m, int64_t* op,
                                                    std::vector<double>& out) { f.child_scores(np_, m, op, out); });
           })
      .def("best_path",
           [](Forest& f, int32_t root, int by) {
             if (by < 0 || by > 2) throw py::value_error("by must be 0 (visits), 1 (value) or 2 (reward)");
             std::vector<int32_t> p;
             {
               py::gil_scoped_release rel;
               p = f.best_path(root, static_cast<sphere::PathBy>(by));
             }
             return to_array(p);
           })
      .def("worst_path",
           [](Forest& f, int32_t root) {
             std::vector<int32_t> p;
             {
               py::gil_scoped_release rel;
               p = f.worst_path(root);
             }
             return to_array(p);
           })
      .def("terminals",
           [](Forest& f, const arr<int32_t>& roots) {
             const int64_t t = len1d(roots, "roots");
             py::array_t<int64_t> off(static_cast<py::ssize_t>(t + 1));
             std::vector<int32_t> nodes;
             std::vector<float> values;
             const int32_t* rp = roots.data();
             int64_t* op = off.mutable_data();
             {
               py::gil_scoped_release rel;
               f.terminals(rp, t, op, nodes, values);
             }
             return py::make_tuple(off, to_array(nodes), to_array(values));
           })
      .def("tree_nodes",
           [](Forest& f, int32_t root) {
             std::vector<int32_t> p;
             {
               py::gil_scoped_release rel;
               p = f.tree_nodes(root);
             }
             return to_array(p);
           })
      SPHERE_BIND_GETTER(get_payload, int64_t)
      SPHERE_BIND_GETTER(get_reward, float)
      SPHERE_BIND_GETTER(get_prior, float)
      SPHERE_BIND_GETTER(get_visits, int32_t)
      SPHERE_BIND_GETTER(get_inflight, int32_t)
      SPHERE_BIND_GETTER(get_value, float)
      SPHERE_BIND_GETTER(get_depth, int32_t)
      SPHERE_BIND_GETTER(get_parent, int32_t)
      SPHERE_BIND_GETTER(get_flags, uint8_t)
      .def("stats",
           [](Forest& f) {
             const sphere::Stats s = f.stats();
             py::dict d;
             d["nodes"] = s.nodes;
             d["trees"] = s.trees;
             d["expanded"] = s.expanded;
             d["terminal"] = s.terminal;
             d["pruned_at_expansion"] = s.pruned_at_expansion;
             d["pruned_subtrees"] = s.pruned_subtrees;
             d["collisions"] = s.collisions;
             d["exhausted_roots"] = s.exhausted_roots;
             d["inflight_roots"] = s.inflight_roots;
             d["depth_histogram"] = s.depth_histogram;
             d["bytes_per_node"] = sphere::kBytesPerNode;
             return d;
           })
      .def("validate", [](Forest& f) { return f.validate(); })
      .def("snapshot", [](py::object self) {
        Forest& f = self.cast<Forest&>();
        py::dict d;
        const auto& hot = f.hot();
        d["parent"] = view(f.parent(), self);
        d["first_child"] = hot_view<int32_t>(hot, offsetof(sphere::Hot, first_child), self);
        d["num_children"] = hot_view<uint16_t>(hot, offsetof(sphere::Hot, num_children), self);
        d["visits"] = hot_view<int32_t>(hot, offsetof(sphere::Hot, visits), self);
        d["inflight"] = hot_view<int32_t>(hot, offsetof(sphere::Hot, inflight), self);
        d["value_sum"] = hot_view<double>(hot, offsetof(sphere::Hot, value_sum), self);
        d["prior"] = hot_view<float>(hot, offsetof(sphere::Hot, prior), self);
        d["init_value"] = hot_view<float>(hot, offsetof(sphere::Hot, init_value), self);
        d["flags"] = hot_view<uint8_t>(hot, offsetof(sphere::Hot, flags), self);
        d["payload"] = view(f.payload(), self);
        d["tree"] = view(f.tree(), self);
        d["reward"] = view(f.reward(), self);
        d["depth"] = view(f.depth(), self);
        d["roots"] = view(f.roots(), self);
        d["tree_collisions"] = view(f.tree_collisions(), self);
        return d;
      });
}
