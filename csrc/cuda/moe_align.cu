// CUDA moe_align_block_size: the counting sort of ../moe_align.h, with no host sync (CUDA-graph safe: buffer
// sizes come from the shapes, scratch comes from the caching allocator) and no order-dependent atomics, so the
// output is the same bits as the CPU kernel and the reference on every run.
//
// The flat ids are cut into `rows` tiles, one warp's each; counts[r][e] (int32, rows x E) holds tile r's histogram
// and is turned in place into the tiles' write bases. A warp scatters its tile in rounds of 32 ids in ascending flat
// index: lane l holds id i = round + l; __match_any_sync gives the lanes of the round with the same expert; the
// lane's rank among them (popc of the lower lanes) is its offset from base[e]; after the round the group's lowest
// lane advances base[e] by the group size. Ranks never race, so the order within an expert is ascending flat index.
// Histograms use integer atomicAdd, which is order-independent.
//
// Two paths, chosen from the shapes:
//   fused (N <= kFusedMaxPairs and E <= kFusedMaxExperts), one launch, one block of kFusedWarps warps, warp w owns
//     tile w: counts [8][E], offsets [E + 1] and the prefix's partial sums in shared memory (41 KiB at E = 1024);
//     it covers decode and prefill up to 1024 tokens at k = 8, where launch latency dominates. kFusedMaxPairs =
//     8192 keeps each warp's scatter to at most 32 rounds.
//   multi-pass (everything else, e.g. T = 4096 at k = 8: N = 32768), tiles of kWarpTile = 64 ids (two rounds), more
//     per tile only where rows * E would pass kMaxCounts (1 MiB of counts): T = 4096 at k = 8, E = 128 is 512 tiles
//     on 128 blocks of 4 warps. Blocks hold `warps` = min(kAlignWarps, 12288 / E) warps (their shared rows fit the
//     48 KiB a block gets without opting in), block b owning tiles b * warps ...:
//       1. count:   each warp counts its tile into its own shared histogram row; the block writes its rows to
//                   counts; also fills sorted_token_ids with the sentinel N (grid-stride);
//       2. prefix:  one block of 1024 threads: column totals in chunks of rows (threads / E threads per column),
//                   padded, block-wide exclusive scan -> offsets; each chunk's rows -> bases; expert_ids by binary
//                   search of the offsets; num_tokens_post_padded;
//       3. scatter: each block loads its warps' base rows into shared memory; each warp scatters its tile there.
// Limits: E <= kMoeAlignMaxExperts = 4096 (shared offsets and partial sums of the prefix kernel: 32 KiB), N + min(E,
// N) * (block_size - 1) < 2^31 (int32 outputs), both checked on the host from the shapes. Ids outside [0, E) cannot be
// checked without a host sync: they are skipped (the Python API rejects them on CPU tensors).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../moe_align_checks.h"
#include "../ops.h"

namespace qwen_fast {
namespace moe_align {  // named (not anonymous) so that cuobjdump and profilers print the kernels' names

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFusedWarps = 8;
constexpr int64_t kFusedMaxPairs = 8192;
constexpr int64_t kFusedMaxExperts = 1024;
constexpr int kPrefixThreads = 1024;
constexpr int kAlignWarps = 4;            // warps (tiles) per block of the count and scatter kernels
constexpr int kBlockSharedInts = 12288;   // 48 KiB: the shared rows of a block's warps
constexpr int64_t kWarpTile = 64;         // ids per tile at least
constexpr int64_t kMaxCounts = 1 << 18;   // rows * E at most
constexpr int kScanSlots = kWarp + 1;  // per-warp sums of the block scan, and the block total

template <typename Id>
__device__ __forceinline__ int expert_at(const Id* ids, int64_t i, int num_experts) {
  const int64_t id = static_cast<int64_t>(ids[i]);
  return is_expert(id, num_experts) ? static_cast<int>(id) : -1;
}

// Threads t, t + stride, ... of [begin, end) add their ids to the histogram (integer atomics: order-independent).
template <typename Id>
__device__ void count_range(const Id* ids, int64_t begin, int64_t end, int32_t* hist, int num_experts, int thread,
                            int stride) {
  for (int64_t i = begin + thread; i < end; i += stride) {
    const int e = expert_at(ids, i, num_experts);
    if (e >= 0) atomicAdd(&hist[e], 1);
  }
}

// One whole warp writes the flat indices [begin, end) at base[e], base[e] + 1, ... in ascending order (see the file
// header); base is the tile's row of write bases, private to this warp.
template <typename Id>
__device__ void scatter_range_warp(const Id* ids, int64_t begin, int64_t end, int32_t* base, int num_experts,
                                   int32_t* sorted, int lane) {
  const unsigned lower_lanes = (1u << lane) - 1u;
  for (int64_t round = begin; round < end; round += kWarp) {
    const int64_t i = round + lane;
    const int e = i < end ? expert_at(ids, i, num_experts) : -1;
    const unsigned same = __match_any_sync(kFullMask, e);
    const unsigned before = same & lower_lanes;
    int position = 0;
    if (e >= 0) position = base[e] + __popc(before);
    __syncwarp();  // every lane has read base[e] before a leader advances it
    if (e >= 0) {
      sorted[position] = static_cast<int32_t>(i);
      if (before == 0) base[e] += __popc(same);
    }
    __syncwarp();  // the advanced bases are visible to the next round
  }
}

// Exclusive scan of one int per thread over the block (blockDim.x a multiple of 32); slots: kScanSlots ints of
// shared memory. Returns the thread's exclusive prefix; *total gets the block's sum.
__device__ int block_exclusive_scan(int value, int* slots, int* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  int inclusive = value;
  for (int d = 1; d < kWarp; d *= 2) {
    const int up = __shfl_up_sync(kFullMask, inclusive, d);
    if (lane >= d) inclusive += up;
  }
  if (lane == kWarp - 1) slots[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int sum = lane < warps ? slots[lane] : 0;
    int running = sum;
    for (int d = 1; d < kWarp; d *= 2) {
      const int up = __shfl_up_sync(kFullMask, running, d);
      if (lane >= d) running += up;
    }
    slots[lane] = running - sum;
    if (lane == kWarp - 1) slots[kWarp] = running;
  }
  __syncthreads();
  *total = slots[kWarp];
  return slots[warp] + inclusive - value;
}

// Shared ints the prefix needs besides the counts: offsets [E + 1], partial sums [max(threads, E)], scan slots.
__host__ __device__ inline int64_t prefix_shared_ints(int64_t num_experts, int64_t threads) {
  return num_experts + 1 + (threads > num_experts ? threads : num_experts) + kScanSlots;
}

// The whole block: from the count matrix [rows, E] (shared or global) to offsets [E + 1] (shared) and, in place,
// the tiles' write bases; then expert_ids and num_tokens_post_padded. Each column is summed and rebased in chunks of
// rows, threads / E threads per column (one chunk when E >= threads); partial: max(threads, E) ints of shared memory.
// Ends after a __syncthreads.
__device__ void prefix_and_expert_ids(int32_t* counts, int64_t rows, int num_experts, int64_t block_size,
                                      int32_t* offsets, int32_t* partial, int* slots, int32_t* expert_ids,
                                      int64_t max_blocks, int32_t* post_padded) {
  const int t = threadIdx.x, threads = blockDim.x;
  const int chunks = max(1, threads / num_experts);
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  for (int j = t; j < chunks * num_experts; j += threads) {  // j = chunk * E + expert: coalesced along experts
    const int e = j % num_experts, c = j / num_experts;
    partial[j] = static_cast<int32_t>(
        column_total(counts, tile_begin(c, chunk_rows, rows), tile_end(c, chunk_rows, rows), num_experts, e));
  }
  __syncthreads();
  for (int e = t; e < num_experts; e += threads) {  // partial -> the ids of the column's earlier chunks
    int64_t total = 0;
    for (int c = 0; c < chunks; ++c) {
      const int32_t count = partial[c * num_experts + e];
      partial[c * num_experts + e] = static_cast<int32_t>(total);
      total += count;
    }
    offsets[e] = static_cast<int32_t>(padded_count(total, block_size));
  }
  __syncthreads();
  const int per_thread = (num_experts + threads - 1) / threads;  // contiguous experts per thread for the scan
  const int first = min(t * per_thread, num_experts), last = min(first + per_thread, num_experts);
  int local = 0;
  for (int e = first; e < last; ++e) local += offsets[e];
  int total = 0;
  int next = block_exclusive_scan(local, slots, &total);
  for (int e = first; e < last; ++e) {
    const int padded = offsets[e];
    offsets[e] = next;
    next += padded;
  }
  if (t == 0) offsets[num_experts] = total;
  __syncthreads();
  for (int j = t; j < chunks * num_experts; j += threads) {
    const int e = j % num_experts, c = j / num_experts;
    column_to_bases(counts, tile_begin(c, chunk_rows, rows), tile_end(c, chunk_rows, rows), num_experts, e,
                    offsets[e] + partial[j]);
  }
  for (int64_t b = t; b < max_blocks; b += threads) {
    expert_ids[b] = expert_of_block(offsets, num_experts, b, block_size);
  }
  if (t == 0) post_padded[0] = total;
  __syncthreads();
}

struct AlignArgs {
  int32_t* sorted;
  int32_t* expert_ids;
  int32_t* post_padded;
  int64_t num_pairs;
  int64_t max_padded;
  int64_t max_blocks;
  int64_t block_size;
  int64_t tile;  // ids per tile
  int64_t rows;  // tiles
  int num_experts;
  int warps;  // tiles per block (multi-pass)
};

template <typename Id>
__global__ void fused_kernel(const Id* __restrict__ ids, AlignArgs a) {
  extern __shared__ int32_t shared[];
  int32_t* counts = shared;                                 // [kFusedWarps, E]
  int32_t* offsets = counts + kFusedWarps * a.num_experts;  // [E + 1]
  int32_t* partial = offsets + a.num_experts + 1;           // [max(threads, E)]
  int* slots = partial + max(static_cast<int>(blockDim.x), a.num_experts);  // [kScanSlots]
  const int t = threadIdx.x, lane = t % kWarp, warp = t / kWarp;
  for (int j = t; j < kFusedWarps * a.num_experts; j += blockDim.x) counts[j] = 0;
  for (int64_t j = t; j < a.max_padded; j += blockDim.x) a.sorted[j] = static_cast<int32_t>(a.num_pairs);
  __syncthreads();
  const int64_t begin = tile_begin(warp, a.tile, a.num_pairs), end = tile_end(warp, a.tile, a.num_pairs);
  int32_t* row = counts + warp * a.num_experts;
  count_range(ids, begin, end, row, a.num_experts, lane, kWarp);
  __syncthreads();
  prefix_and_expert_ids(counts, kFusedWarps, a.num_experts, a.block_size, offsets, partial, slots, a.expert_ids,
                        a.max_blocks, a.post_padded);
  // The sentinel fill above is ordered before these writes by the block barriers in between.
  scatter_range_warp(ids, begin, end, row, a.num_experts, a.sorted, lane);
}

template <typename Id>
__global__ void count_kernel(const Id* __restrict__ ids, int32_t* __restrict__ counts, AlignArgs a) {
  extern __shared__ int32_t hist[];  // [warps, E]: one histogram row per warp (tile)
  const int t = threadIdx.x, lane = t % kWarp, warp = t / kWarp;
  const int e = a.num_experts, cells = a.warps * e;
  for (int j = t; j < cells; j += blockDim.x) hist[j] = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + t; j < a.max_padded; j += stride) {
    a.sorted[j] = static_cast<int32_t>(a.num_pairs);
  }
  __syncthreads();
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * a.warps, row = first_row + warp;
  if (row < a.rows) {
    count_range(ids, tile_begin(row, a.tile, a.num_pairs), tile_end(row, a.tile, a.num_pairs), hist + warp * e, e,
                lane, kWarp);
  }
  __syncthreads();
  for (int j = t; j < cells; j += blockDim.x) {  // the block's rows, coalesced
    if (first_row + j / e < a.rows) counts[first_row * e + j] = hist[j];
  }
}

__global__ void prefix_kernel(int32_t* __restrict__ counts, AlignArgs a) {
  extern __shared__ int32_t shared[];
  int32_t* offsets = shared;                                                   // [E + 1]
  int32_t* partial = offsets + a.num_experts + 1;                              // [max(threads, E)]
  int* slots = partial + max(static_cast<int>(blockDim.x), a.num_experts);  // [kScanSlots]
  prefix_and_expert_ids(counts, a.rows, a.num_experts, a.block_size, offsets, partial, slots, a.expert_ids,
                        a.max_blocks, a.post_padded);
}

template <typename Id>
__global__ void scatter_kernel(const Id* __restrict__ ids, const int32_t* __restrict__ bases, AlignArgs a) {
  extern __shared__ int32_t shared_bases[];  // [warps, E]: the block's rows of write bases
  const int t = threadIdx.x, lane = t % kWarp, warp = t / kWarp;
  const int e = a.num_experts, cells = a.warps * e;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * a.warps, row = first_row + warp;
  for (int j = t; j < cells; j += blockDim.x) {
    if (first_row + j / e < a.rows) shared_bases[j] = bases[first_row * e + j];
  }
  __syncthreads();
  if (row >= a.rows) return;  // uniform over the warp
  scatter_range_warp(ids, tile_begin(row, a.tile, a.num_pairs), tile_end(row, a.tile, a.num_pairs),
                     shared_bases + warp * e, e, a.sorted, lane);
}

template <typename Id>
void launch(const at::Tensor& ids, AlignArgs a, cudaStream_t stream) {
  const Id* id_ptr = ids.const_data_ptr<Id>();
  const int64_t e = a.num_experts;
  if (a.num_pairs <= kFusedMaxPairs && e <= kFusedMaxExperts) {
    a.rows = kFusedWarps;
    a.tile = std::max<int64_t>(1, (a.num_pairs + kFusedWarps - 1) / kFusedWarps);
    const size_t shared = sizeof(int32_t) * (kFusedWarps * e + prefix_shared_ints(e, kFusedWarps * kWarp));
    fused_kernel<Id><<<1, kFusedWarps * kWarp, shared, stream>>>(id_ptr, a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t max_rows = std::max<int64_t>(1, kMaxCounts / e);
  const int64_t tile = std::max(kWarpTile, (a.num_pairs + max_rows - 1) / max_rows);
  a.tile = (tile + kWarp - 1) / kWarp * kWarp;  // whole rounds of 32 ids
  a.rows = std::max<int64_t>(1, (a.num_pairs + a.tile - 1) / a.tile);
  a.warps = static_cast<int>(std::clamp<int64_t>(kBlockSharedInts / e, 1, kAlignWarps));
  const at::Tensor counts = at::empty({a.rows, e}, ids.options().dtype(at::kInt));  // every entry is written
  int32_t* count_ptr = counts.mutable_data_ptr<int32_t>();
  const unsigned blocks = static_cast<unsigned>((a.rows + a.warps - 1) / a.warps);
  const size_t rows_shared = sizeof(int32_t) * a.warps * e;
  count_kernel<Id><<<blocks, a.warps * kWarp, rows_shared, stream>>>(id_ptr, count_ptr, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t prefix_shared = sizeof(int32_t) * prefix_shared_ints(e, kPrefixThreads);
  prefix_kernel<<<1, kPrefixThreads, prefix_shared, stream>>>(count_ptr, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scatter_kernel<Id><<<blocks, a.warps * kWarp, rows_shared, stream>>>(id_ptr, count_ptr, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace moe_align

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_align_block_size_cuda(const at::Tensor& topk_ids,
                                                                          int64_t block_size, int64_t num_experts) {
  const AlignSizes sizes = check_moe_align_block_size(topk_ids, block_size, num_experts);
  const at::cuda::OptionalCUDAGuard guard(topk_ids.device());
  auto [sorted, expert_ids, post_padded] = empty_moe_align_outputs(topk_ids, sizes);
  const at::Tensor ids = topk_ids.contiguous();
  moe_align::AlignArgs args{sorted.mutable_data_ptr<int32_t>(),
                 expert_ids.mutable_data_ptr<int32_t>(),
                 post_padded.mutable_data_ptr<int32_t>(),
                 sizes.num_pairs,
                 sizes.max_num_tokens_padded,
                 sizes.max_num_blocks,
                 block_size,
                 /*tile=*/0,
                 /*rows=*/0,
                 static_cast<int>(num_experts),
                 /*warps=*/moe_align::kFusedWarps};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (ids.scalar_type() == at::kInt) {
    moe_align::launch<int32_t>(ids, args, stream);
  } else {
    moe_align::launch<int64_t>(ids, args, stream);
  }
  return {sorted, expert_ids, post_padded};
}

TORCH_LIBRARY_IMPL(qwen_fast, CUDA, m) { m.impl("moe_align_block_size", &moe_align_block_size_cuda); }

}  // namespace qwen_fast
