// Every op schema of qwen_fast, in one block. Implementations are registered per dispatch key next to their code
// (cpu/*.cpp: CPU, cuda/*.cu: CUDA); Python registers a fake for each op next to its checks in qwen_fast/ops/.
#include <Python.h>
#include <torch/library.h>

#include "cpu/isa.h"

TORCH_LIBRARY(qwen_fast, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, Tensor? k_scale=None, Tensor? v_scale=None) -> ()");
  m.def(
      "fused_topk(Tensor gating_output, int topk, bool renormalize, str scoring_func, "
      "Tensor? e_score_correction_bias, int? num_expert_group, int? topk_group, float routed_scaling_factor, "
      "str group_scoring) -> (Tensor, Tensor)");
  m.def("moe_align_block_size(Tensor topk_ids, int block_size, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rotary_embedding(Tensor positions, Tensor query, Tensor key, Tensor cos_sin_cache, bool is_neox) -> "
      "(Tensor, Tensor)");
  m.def(
      "qk_norm_rope_and_cache(Tensor query, Tensor key, Tensor value, Tensor q_norm_weight, Tensor k_norm_weight, "
      "float eps, Tensor positions, Tensor cos_sin_cache, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, bool is_neox) -> (Tensor, Tensor)");
  m.def(
      "flash_attn_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor block_table, Tensor? cache_leftpad, float softmax_scale, int window_left, "
      "int window_right, float softcap, int num_splits, Tensor? k_descale, Tensor? v_descale) -> (Tensor, Tensor)");
  m.def(
      "flash_attn_varlen_func(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right, float softcap, "
      "bool return_lse) -> (Tensor, Tensor)");
  m.def(
      "fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
      "Tensor? expert_map=None, str activation=\"silu\", Tensor? w13_scale=None, Tensor? w2_scale=None, "
      "int[]? block_shape=None) -> Tensor");
  m.def("linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
}

// qwen_fast._C.cpu_isa() -> the instruction set the CPU kernels use now (cpu/isa.h: "baseline", "avx2", "avx512" or
// "avx512_bf16"); ValueError for a QWEN_FAST_CPU_ISA this CPU cannot run.
static PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(qwen_fast::isa_name(qwen_fast::cpu_isa()));
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_ValueError, error.what_without_backtrace());
    return nullptr;
  }
}

// A plain Python module, so that `import qwen_fast._C` loads the library and runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use now (QWEN_FAST_CPU_ISA lowers it)."},
      {nullptr, nullptr, 0, nullptr}};
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "qwen_fast native ops (see torch.ops.qwen_fast)", -1,
                               methods};
  return PyModule_Create(&module);
}
