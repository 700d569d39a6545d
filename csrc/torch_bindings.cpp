// Every op schema of qwen_fast, in one block. Implementations are registered per dispatch key next to their code
// (cpu/*.cpp: CPU, cuda/*.cu: CUDA); Python registers a fake for each op in qwen_fast/ops/_fakes.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(qwen_fast, m) {
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping) -> ()");
  m.def("moe_align_block_size(Tensor topk_ids, int block_size, int num_experts) -> (Tensor, Tensor, Tensor)");
  m.def(
      "flash_attn_varlen_func(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
      "int max_seqlen_k, float softmax_scale, bool causal, int window_left, int window_right) -> Tensor");
  m.def("fused_experts(Tensor hidden_states, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids) -> Tensor");
}

// A plain Python module, so that `import qwen_fast._C` loads the library and runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "qwen_fast native ops (see torch.ops.qwen_fast)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
