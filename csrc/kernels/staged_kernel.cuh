// The one-read kernel: rows staged in shared memory by the bulk copy engine.
//
// A persistent grid of 256-thread blocks (two per SM) walks over tiles of rows. A tile is
// 32 KiB of scores: R = 256 / rt rows of rt * 8 sixteen-byte chunks each (rt threads per row,
// a power of two up to 256), or, for rows longer than 32 KiB, one 32 KiB slice of a row for
// each block of a thread-block cluster of 4 to 16 blocks. Rows of one to two slices, and of 16 to
// 32, take blocks of 512 threads (WIDE, one an SM), with 64 KiB tiles: one block a row, or a
// cluster of 16. (16 KiB and 32 KiB, 4 chunks a thread, for rows with two operand tensors.)
// Warp 0 (in the warp-specialised blocks of rows with two operand tensors, a ninth warp of its
// own; in cluster rows, every warp its share of the block's pieces) copies the visible part of
// each row of a tile into one of 2 to 6 shared-memory stages with `cp.async.bulk`, completing on
// the stage's mbarrier, so that tiles are in flight while a tile is computed; with them, where it
// pays, the mask / bias rows the tile reads (StageLayout). Thread `lane` of a row takes chunks
// c * rt + lane (c < 8) of its slice: it forms their logits once (kept in registers when the row
// has at most one mask / bias tensor), reduces an online max / sum, and writes the outputs with
// 16-byte stores (in blocks of aligned rows of 16 to 64 threads without a window, cluster or
// producer warp: into the stage, sent by bulk copies); hidden chunks (causal, window) are never
// read and are written as zeros.
//
// Cluster rows (and rows of one wide block) without mask, bias or slopes, in launches whose every
// row sees every key and whose rows lie K elements apart (rows_whole, rows_linear: softmax.h),
// take the WHOLE kernels: a row starts at row * K, no key's visibility is tested and a refill is
// one copy a warp (issue_linear_piece), with the same arithmetic. With a scale > 0 (RAW) they test
// no chunk at all: the slots of the chunks past the row's end hold -inf (kPadded); with 16-bit
// scores they take the maximum on the packed pairs (kPairMax).
//
// The reduction order is fixed by (chunk slot, element, lane butterfly, warp order, cluster rank
// order; the lanes of a warp take their maximum first, and in a cluster the warps and ranks too),
// which depends only on rt and the cluster size, so only on K and the dtype. Rows that cannot be
// read with 16-byte vectors (unaligned, strided) take the same kernel with ALIGNED = false: each
// thread reads its own chunks element by element, and the logits, hence the bits, are the same.
#pragma once

#include <cstdlib>

#include "common.cuh"

namespace tp_softmax {
namespace detail {

constexpr int kStagedThreads = 256;            // compute threads of a block of rows of one slice
// (kWideThreads, softmax.h: of a block of a longer row, alone or in a cluster; one block an SM)
constexpr int kStagedSmemBudget = 110 * 1024;  // dynamic shared memory for the stages (two blocks/SM)
constexpr int kWideSmemBudget = 220 * 1024;    // (one block an SM)
constexpr int kMaxStages = 6;
template <bool WIDE>
constexpr int kComputeThreads = WIDE ? kWideThreads : kStagedThreads;
template <bool WIDE>
constexpr int kSmemBudget = WIDE ? kWideSmemBudget : kStagedSmemBudget;

// Rows of 4 chunks a thread (16-byte aligned, one block per row) run in a warp-specialised block:
// the 256 compute threads and a ninth warp, the producer, that issues every copy and writes each
// tile's row table. The compute warps no longer wait for a copy warp's turn: a stage is refilled
// as soon as its eight warps have read it. Producer and compute warps meet at two named barriers
// per stage, where one side arrives without waiting: kTableBar + s (the table of the stage's tile
// is written; the compute warps wait for the next tile's table at the barrier they meet at in the
// middle of each tile anyway) and kFreeBar + s (the stage and its table have been read). (An
// mbarrier would order the table's ordinary stores before the reads as well, but the race checker
// orders them only by barriers.) Without the copies in their code, the compute threads fit in the
// 96 registers a thread of two such blocks an SM has (18 warps: five on some scheduler,
// 5 x 32 x 96 <= 16384).
template <int C, bool ALIGNED, bool CLUSTER>
constexpr bool kWarpSpecialised = warp_specialised(C, ALIGNED, CLUSTER);  // (WIDE implies CLUSTER)
constexpr int kWsThreads = kStagedThreads + 32;
constexpr int kComputeBar = 1, kTableBar = 2, kFreeBar = 2 + kMaxStages;  // named barrier ids
static_assert(kFreeBar + kMaxStages <= 16, "a block has 16 named barriers");
template <int C, bool ALIGNED, bool CLUSTER, bool WIDE>
constexpr int kBlockThreads = kWarpSpecialised<C, ALIGNED, CLUSTER> ? kWsThreads : kComputeThreads<WIDE>;

// C chunks per thread: 8 (32 KiB tiles, 3 stages without staged operands), or 4 (16 KiB tiles,
// 6 stages) for rows that read a mask or bias tensor (their operand loads and 8 chunks of logits
// would not fit in the 128 registers of two blocks per SM).
template <int C, bool WIDE>
struct TileGeometry {
  static constexpr int kTileBytes = kComputeThreads<WIDE> * C * 16;
  static_assert(kSmemBudget<WIDE> / kTileBytes >= 2, "stage count");
};

// Where the chunks of a tile's mask / bias rows are read from: global memory, or rows the copy
// warp staged beside the scores, one per tile row (kOpPerRow), per (batch, head) (kOpPerHead: the
// operand is broadcast over queries) or per batch (kOpPerBatch: Q == 1 and broadcast over heads).
enum OpMode : int { kOpGlobal = -1, kOpPerRow = 0, kOpPerHead = 1, kOpPerBatch = 2 };

// Rows of 4 chunks a thread (two operand tensors) take their span and pointers from a table the
// copy warp (the producer warp, where warp-specialised) writes as it issues a tile (it computes
// them anyway), instead of every thread computing them again: two divisions and four pointers a
// row, about a sixth of the instructions of BLOOM prefill's kernel (ncu, v12, with 64-bit
// divisions). With 8 chunks a thread, the rows kept in registers from the table spill.
template <int C>
constexpr bool kRowTable = C == 4;

// A stage: the score tile, then the staged mask rows, then the staged bias rows. Operands are
// staged where their rows are 16-byte aligned and whole 16-byte units, and while at least two
// stages fit the budget (staged_layout); otherwise they are read from global memory (and
// L2-prefetched when each row has its own). Staging changes only where a value is read, never the
// arithmetic: the bits are the same either way.
struct StageLayout {
  int stages;       // 2 .. kMaxStages
  int stage_bytes;  // a multiple of 128
  int mask_mode, bias_mode;
  int mask_off, bias_off;  // byte offsets of the operand regions in a stage
  int whole_tile;          // a tile's scores are one contiguous run of whole rows: one copy
  int table_bytes;         // per stage: the tile's rows (Row objects) after all the stages, or 0
};

struct StagedScratch {
  unsigned long long full[kMaxStages];  // one mbarrier per stage
  float warp_max[2][kWideThreads / 32];
  float warp_sum[2][kWideThreads / 32];
  ClusterExchange xc;                   // cluster rows
};

// A tile's geometry, the same for the copy warps and every thread. A row slot holds
// C * rt chunks in C pieces of rt: without a cluster, piece c is chunks [c * rt, (c + 1) * rt) of
// the row; in a cluster of n blocks, block q holds the row's pieces c * n + q (pieces interleaved
// across the blocks, so causal rows load them evenly).
struct TileShape {
  int rt;       // threads of a block per row (chunks per piece), a power of two
  int rt_shift; // log2(rt)
  int rows;     // rows per tile (compute threads / rt)
  int slot;     // chunks of a row slot in a stage (rt * C)
  int pieces;   // pieces per row slot that are copied separately (C in a cluster, else 1)
  int cluster;  // blocks per row
  int rank;     // this block's rank in its cluster
  int nchunks;  // chunks of a row

  // Global chunk index of slot position `l` (0 <= l < slot) of this block.
  __device__ __forceinline__ int chunk_of(int l) const {
    return (((l >> rt_shift) * cluster + rank) << rt_shift) + (l & (rt - 1));
  }
};

// The visible chunks [c0, c1) of piece `pc` of a row slot (local start `l0`); false if none.
__device__ __forceinline__ bool piece_chunks(int lo, int hi, const TileShape& ts, int V, int pc, int& c0, int& c1,
                                            int& l0) {
  if (lo > hi) return false;
  const int len = ts.pieces == 1 ? ts.slot : ts.rt;
  l0 = pc * len;
  const int g0 = ts.chunk_of(l0);
  const int lo_c = lo / V, hi_c = hi / V + 1;
  const int end = g0 + len < ts.nchunks ? g0 + len : ts.nchunks;
  c0 = lo_c > g0 ? lo_c : g0;
  c1 = hi_c < end ? hi_c : end;
  l0 += c0 - g0;
  return c0 < c1;
}

__device__ __forceinline__ void prefetch_l2(const void* begin, const void* end) {
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(begin) + 15) & ~uintptr_t{15};
  const uintptr_t hi = reinterpret_cast<uintptr_t>(end) & ~uintptr_t{15};
  if (hi > lo)
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"(static_cast<uint32_t>(hi - lo))
                 : "memory");
}

// One bulk copy into a stage; the stage's barrier first expects its bytes.
__device__ __forceinline__ void stage_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar,
                                           uint64_t policy) {
  mbar_expect_tx(bar, bytes);
  bulk_copy(dst, src, bytes, bar, policy);
}

// Chunks [c0, c1) (slot position l0) of an operand row into its staged row `dst_row`, widened to
// whole 16-byte units (the host stages an operand only when its rows are made of whole units, so
// the widened range stays inside the row, and inside the slot's piece).
template <int V, typename OT>
__device__ __forceinline__ void stage_operand(const OT* row, int c0, int c1, int l0, uint8_t* dst_row, uint32_t bar,
                                              uint64_t policy) {
  constexpr int kChunkBytes = V * static_cast<int>(sizeof(OT));
  constexpr int g = kChunkBytes >= 16 ? 1 : 16 / kChunkBytes;  // chunks per 16-byte unit
  const int a = c0 & -g, e = (c1 + g - 1) & -g;
  stage_copy(smem_u32(dst_row + (l0 - (c0 - a)) * kChunkBytes), row + static_cast<int64_t>(a) * V,
             static_cast<uint32_t>((e - a) * kChunkBytes), bar, policy);
}

// A grouped mode's staged operand row for tile row `rr` (`r`): its group's ordinal in the tile.
// The row is row `idx` of its group (the query, or with Q == 1 the head), so the group started
// before the tile's first row iff idx >= rr; else 1 + (rr - idx - 1) / u groups (u rows each)
// started in the tile up to here. The copy warp and the compute threads both place rows by it.
__device__ __forceinline__ int group_slot(const SoftmaxParams& P, int mode, const RowSpan<int>& r, int rr) {
  const int64_t idx = mode == kOpPerHead ? r.i : r.h;
  const int64_t u = mode == kOpPerHead ? P.Q : P.H;
  if (idx >= rr) return 0;
  const int over = rr - static_cast<int>(idx) - 1;  // < rows per tile
  return 1 + (u > over ? 0 : over / static_cast<int>(u));
}

// Staged operand rows of a grouped mode: the lane of the group's first row in the tile (query, or
// with Q == 1 head, 0; or the tile's first row) copies the visible span of the group's rows in the
// tile, from that row's lo to the hi of the group's last row in the tile (lo and hi grow with the
// query), into its group_slot.
template <int V, typename OT>
__device__ __forceinline__ void stage_group(const SoftmaxParams& P, const TileShape& ts, int mode, const OT* src,
                                            const RowSpan<int>& r, int rr, int64_t row, int64_t last, int pc,
                                            uint8_t* region, int row_bytes, uint32_t bar) {
  if (rr != 0 && (mode == kOpPerHead ? r.i : r.h) != 0) return;  // not the group's first row here
  int hi = r.hi;
  if (mode == kOpPerHead) {
    const int64_t rest = P.Q - 1 - r.i < last - row ? P.Q - 1 - r.i : last - row;  // later rows of the group
    hi = RowSpan<int>::hi_at(P, r.p + static_cast<int>(rest));
  }  // kOpPerBatch: Q == 1, every row of the group has the same span
  int c0, c1, l0;
  if (piece_chunks(r.lo, hi, ts, V, pc, c0, c1, l0))
    stage_operand<V>(src, c0, c1, l0, region + group_slot(P, mode, r, rr) * row_bytes, bar, l2_policy<false>());
}

// A copy warp: copy tile `t` into the stage at `stage` (completing on `bar`): the visible chunks
// of each row's scores (or the whole tile in one copy, L.whole_tile), and the operand rows that
// are staged: per row (the row's visible chunks) or per group (stage_group). Operand rows read
// from global memory that each row has of its own are prefetched into L2 instead. The warp takes
// the part-th of NPARTS equal runs of the tile's (row, piece) jobs (the whole-tile copy goes with
// part 0). Each lane raises the barrier's transaction count before each of its copies; lane 0
// arrives once all have (the barrier expects one arrival a part). With TABLE, each row's Row also
// goes into `table` for the compute threads. (Operands reach this kernel only with stride 1 along
// K: rows_vectorisable.)
template <typename T, MaskKind MK, BiasKind BK, bool TABLE, int NPARTS = 1>
__device__ __forceinline__ void issue_tile(const SoftmaxParams& P, const TileShape& ts, const StageLayout& L,
                                           int64_t t, int64_t rows, uint8_t* stage, uint32_t bar, uint8_t* table,
                                           int part = 0) {
  constexpr int V = 16 / sizeof(T);
  using R = Row<T, MK, BK, int>;
  const int mask_row_bytes = ts.slot * V * static_cast<int>(sizeof(typename R::MaskT));
  const int bias_row_bytes = ts.slot * V * static_cast<int>(sizeof(typename R::BiasT));
  const uint64_t once = l2_policy<true>();
  const int lane = threadIdx.x & 31;
  const int64_t first = t * ts.rows;
  const int64_t last = (first + ts.rows < rows ? first + ts.rows : rows) - 1;
  const int jobs = ts.rows * ts.pieces;  // (row, piece) pairs; pieces is 1 or rows is 1
  const int per = (jobs + NPARTS - 1) / NPARTS;
  const int j_end = (part + 1) * per < jobs ? (part + 1) * per : jobs;
  if (L.whole_tile && part == 0 && lane == 0)
    stage_copy(smem_u32(stage), static_cast<const T*>(P.in) + first * P.K,
               static_cast<uint32_t>((last - first + 1) * P.K * static_cast<int64_t>(sizeof(T))), bar, once);
  for (int j = part * per + lane; j < j_end; j += 32) {
    const int rr = ts.pieces == 1 ? j : 0, pc = ts.pieces == 1 ? 0 : j;
    const int64_t row = first + rr;
    if (!TABLE && row > last) break;
    // With TABLE, the row's span and pointers go to the compute threads too (past the last row:
    // the last's).
    const R r(P, TABLE && row > last ? last : row);
    if (TABLE && pc == 0) reinterpret_cast<R*>(table)[rr] = r;
    if (TABLE && row > last) continue;
    if constexpr (R::kMask) {
      if (L.mask_mode > kOpPerRow)
        stage_group<V>(P, ts, L.mask_mode, r.mask, r, rr, row, last, pc, stage + L.mask_off, mask_row_bytes, bar);
    }
    if constexpr (R::kBias) {
      if (L.bias_mode > kOpPerRow)
        stage_group<V>(P, ts, L.bias_mode, r.bias, r, rr, row, last, pc, stage + L.bias_off, bias_row_bytes, bar);
    }
    int c0, c1, l0;
    if (!piece_chunks(r.lo, r.hi, ts, V, pc, c0, c1, l0)) continue;
    if (!L.whole_tile)
      stage_copy(smem_u32(stage + (static_cast<size_t>(rr) * ts.slot + l0) * 16), r.in + static_cast<int64_t>(c0) * V,
                 static_cast<uint32_t>(c1 - c0) * 16u, bar, once);
    // Operand rows of their own: staged beside the scores, or prefetched into L2 (their visible
    // part). A row broadcast over queries that is not staged is read by many tiles and stays in
    // L2; prefetching it again for every tile cost more than it saved (docs/perf.md, v10).
    if constexpr (R::kMask) {
      if (L.mask_mode == kOpPerRow) {
        stage_operand<V>(r.mask, c0, c1, l0, stage + L.mask_off + rr * mask_row_bytes, bar, once);
      } else if (L.mask_mode == kOpGlobal && P.mask_stride[2] != 0) {
        prefetch_l2(r.mask + static_cast<int64_t>(c0) * V, r.mask + static_cast<int64_t>(c1) * V);
      }
    }
    if constexpr (R::kBias) {
      if (L.bias_mode == kOpPerRow) {
        stage_operand<V>(r.bias, c0, c1, l0, stage + L.bias_off + rr * bias_row_bytes, bar, once);
      } else if (L.bias_mode == kOpGlobal && P.bias_stride[2] != 0) {
        prefetch_l2(r.bias + static_cast<int64_t>(c0) * V, r.bias + static_cast<int64_t>(c1) * V);
      }
    }
  }
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}

// issue_tile for a cluster row of LinearRows (WHOLE kernels): warp `part` of the block copies
// piece `part` of tile `t`'s one row (its slot position's chunks, as many as the row has; a wide
// block alone has one piece, the whole slot) into the stage; every warp's lane 0 arrives once.
// The row starts at t * K: no row span to work out, no visibility to clip to.
template <typename T>
__device__ __forceinline__ void issue_linear_piece(const SoftmaxParams& P, const TileShape& ts, int64_t t,
                                                   uint8_t* stage, uint32_t bar, int part) {
  constexpr int V = 16 / sizeof(T);
  const int lane = threadIdx.x & 31;
  if (lane == 0 && part < ts.pieces) {
    // piece_chunks' range for a row that sees every key (piece_chunks itself, clipping to lo and
    // hi, took 16 instructions more)
    const int len = ts.pieces == 1 ? ts.slot : ts.rt;
    const int l0 = part * len;
    const int g0 = ts.chunk_of(l0);
    const int c1 = g0 + len < ts.nchunks ? g0 + len : ts.nchunks;
    if (g0 < c1)
      stage_copy(smem_u32(stage + static_cast<size_t>(l0) * 16),
                 static_cast<const T*>(P.in) + t * P.K + static_cast<int64_t>(g0) * V,
                 static_cast<uint32_t>(c1 - g0) * 16u, bar, l2_policy<true>());
  }
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}

// ---- host: the stage layout ---------------------------------------------------------------------
// Where an operand's rows come from: staged when they are whole, 16-byte aligned 16-byte units.
inline int operand_mode(const SoftmaxParams& p, const void* ptr, const int64_t* stride, int elem_bytes) {
  if (!rows_vectorisable(ptr, stride, 16 / elem_bytes, elem_bytes) || (p.K * elem_bytes) % 16 != 0) return kOpGlobal;
  if (p.Q == 1) return stride[1] == 0 ? kOpPerBatch : kOpPerRow;
  return stride[2] == 0 ? kOpPerHead : kOpPerRow;
}

// Rows of `rt` threads (aligned path): which operands are staged, the stage size and count.
// TP_SOFTMAX_STAGE_OPERANDS=0 reads every operand from global memory, TP_SOFTMAX_MAX_STAGES=N
// (2 .. kMaxStages) takes at most N stages (both for comparisons: the results are the same bits).
template <typename T, MaskKind MK, BiasKind BK, int C, bool WIDE>
StageLayout staged_layout(const SoftmaxParams& p, int rt, int cluster) {
  using R = Row<T, MK, BK, int>;
  constexpr int64_t V = 16 / sizeof(T);
  constexpr int64_t kTile = TileGeometry<C, WIDE>::kTileBytes;
  const int64_t rows = kComputeThreads<WIDE> / rt, slot = int64_t{rt} * C;
  const char* env = std::getenv("TP_SOFTMAX_STAGE_OPERANDS");
  const bool stage = env == nullptr || env[0] != '0';
  const char* cap_env = std::getenv("TP_SOFTMAX_MAX_STAGES");
  const int cap_read = cap_env != nullptr ? std::atoi(cap_env) : kMaxStages;
  const int cap = cap_read < 2 ? 2 : cap_read > kMaxStages ? kMaxStages : cap_read;
  int mm = R::kMask && stage ? operand_mode(p, p.mask, p.mask_stride, sizeof(typename R::MaskT)) : kOpGlobal;
  int bm = R::kBias && stage ? operand_mode(p, p.bias, p.bias_stride, sizeof(typename R::BiasT)) : kOpGlobal;
  // An operand row shared over queries is staged only for tiles of 8 rows or more where warp 0
  // copies: with fewer, its copies lengthen the copy warp's turn (the block waits for it at the
  // next barrier) by more than the reads they save (BLOOM prefill: 4 rows a tile, efficiency 0.60
  // staged against 0.69; docs/perf.md, v11). A producer warp of their own (warp-specialised
  // blocks) copies them outside the compute warps' path. Per-batch rows (Q == 1) are staged
  // regardless.
  if (rows < 8 && !warp_specialised(C, true, cluster > 1)) {
    if (mm == kOpPerHead) mm = kOpGlobal;
    if (bm == kOpPerHead) bm = kOpGlobal;
  }
  auto region = [&](int mode, int64_t elem_bytes) -> int64_t {
    if (mode == kOpGlobal) return 0;
    // Operand rows per tile: tiles start at multiples of `rows`, groups at multiples of u.
    const int64_t u = mode == kOpPerHead ? p.Q : mode == kOpPerBatch ? p.H : 1;  // rows per operand row
    int64_t n = (rows - 1) / u + 2 < rows ? (rows - 1) / u + 2 : rows;
    if (u % rows == 0) n = 1;
    if (rows % u == 0) n = rows / u;
    return n * slot * V * elem_bytes;
  };
  // Every row whole and visible (with Q == 1 a causal row sees every key), rows contiguous, a row
  // filling its slot: a tile is one run of memory.
  const bool whole = cluster == 1 && (!p.causal || p.Q == 1) && p.window == 0 && p.K / V == slot &&
                     p.in_stride[2] == p.K &&
                     p.in_stride[1] == p.Q * p.K && (p.B == 1 || p.in_stride[0] == p.H * p.Q * p.K);
  const int64_t table = kRowTable<C> ? (rows * static_cast<int64_t>(sizeof(R)) + 127) / 128 * 128 : 0;
  for (;;) {
    const int64_t mb = region(mm, sizeof(typename R::MaskT)), bb = region(bm, sizeof(typename R::BiasT));
    const int64_t total = (kTile + mb + bb + 127) / 128 * 128;
    const int64_t n = kSmemBudget<WIDE> / (total + table);  // stages that fit
    if (n >= 2) {
      return {static_cast<int>(n < cap ? n : cap), static_cast<int>(total), mm, bm,
              static_cast<int>(kTile), static_cast<int>(kTile + mb), whole, static_cast<int>(table)};
    }
    if (mb >= bb) {
      mm = kOpGlobal;  // the larger region goes back to global memory
    } else {
      bm = kOpGlobal;
    }
  }
}

// Named barriers: wait for `threads` arrivals (this warp's included), or arrive without waiting.
__device__ __forceinline__ void bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// The producer warp of a warp-specialised block: the block's tiles t = blockIdx.x + i * gridDim.x,
// tile i into stage i % stages once the compute warps have read the tile that stage held.
template <typename T, MaskKind MK, BiasKind BK>
__device__ __forceinline__ void produce_tiles(const SoftmaxParams& P, const TileShape& ts, const StageLayout& L,
                                              int64_t ntiles, int64_t rows, StagedScratch& sh, uint8_t* stage_mem,
                                              uint8_t* table) {
  int s = 0;  // the stage of tile i
  for (int64_t t = blockIdx.x, i = 0; t < ntiles; t += gridDim.x, ++i) {
    if (i >= L.stages) bar_sync(kFreeBar + s, kWsThreads);
    issue_tile<T, MK, BK, true>(P, ts, L, t, rows, stage_mem + s * L.stage_bytes, smem_u32(&sh.full[s]),
                                table + s * L.table_bytes);
    bar_arrive(kTableBar + s, kWsThreads);
    if (++s == L.stages) s = 0;
  }
}

// Diagnostics (scripts/timeline_probe.cu defines TP_SOFTMAX_TIMELINE): thread 0 of each block
// notes the global timer at fixed points of its work in shared memory and writes them to
// `timeline` when it leaves (kTimelineSlots a block: the SM, entry, set-up done, first tile's
// copies issued, all first copies issued, for each of the first kTimelineTiles tiles the end of
// its wait / of the block's own partial / of the exchange / of its writes, and the exit). Without
// the macro the hooks are empty and the kernels are the same code.
constexpr int kTimelineTiles = 16;
enum TimelineSlot : int {
  kTlSm = 0, kTlEntry, kTlSetup, kTlIssued0, kTlIssued, kTlTile, kTlDone = kTlTile + 4 * kTimelineTiles,
  kTimelineSlots
};
#ifdef TP_SOFTMAX_TIMELINE
__device__ unsigned long long* timeline;
__device__ __forceinline__ unsigned long long* timeline_buf() {
  __shared__ unsigned long long buf[kTimelineSlots];
  return buf;
}
__device__ __forceinline__ void timeline_mark(int slot) {
  if (threadIdx.x == 0) {
    unsigned long long v;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(v));
    if (slot == kTlEntry)
      for (int i = 0; i < kTimelineSlots; ++i) timeline_buf()[i] = 0;
    timeline_buf()[slot] = v;
    if (slot == kTlDone && timeline != nullptr) {
      unsigned sm;
      asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
      timeline_buf()[kTlSm] = sm;
      for (int i = 0; i < kTimelineSlots; ++i)
        timeline[static_cast<size_t>(blockIdx.x) * kTimelineSlots + i] = timeline_buf()[i];
    }
  }
}
#else
__device__ __forceinline__ void timeline_mark(int) {}
#endif
// what: 0 the tile's data is here, 1 the block's partial is formed, 2 the row's is (the cluster
// exchanged), 3 its stores are issued
__device__ __forceinline__ void timeline_tile(int k, int what) {
  if (k < kTimelineTiles) timeline_mark(kTlTile + 4 * k + what);
}

// ---- the kernel ----------------------------------------------------------------------------------
// Grid: units of `cluster` blocks; unit u takes tiles u, u + units, ... (`ntiles` in all).
// CLUSTER: rows longer than one slice, shared by a cluster of `cluster` (2 to 16) blocks; else
// `cluster` is 1 (a template parameter so that rows of one block carry none of the exchange).
// WIDE (with CLUSTER): blocks of kWideThreads threads, one an SM, a row's slice of twice the
// length each, alone (`cluster` 1: no exchange) or in a cluster of 16 (choose_row_config).
// WHOLE (aligned cluster or wide rows without operands of LinearRows launches): see the top.
// RAW (rows without added operands, a scale > 0 whose product with log2(e) is finite: raw_scale):
// the logits are kept unscaled and the scale goes into the exponent's multiply-add,
// exp2(x * (scale * log2 e) - max * log2 e), with max = the largest raw score times the scale
// (exactly the largest product: rounding keeps the order). One multiplication a key fewer; with a
// scale of 1 the same bits.
template <typename T, MaskKind MK, BiasKind BK, int C, bool ALIGNED, bool CLUSTER, bool WIDE = false, bool RAW = false,
          bool WHOLE = false>
__global__ void __launch_bounds__(kBlockThreads<C, ALIGNED, CLUSTER, WIDE>, WIDE ? 1 : 2)
staged_softmax_kernel(const SoftmaxParams P, int rt, int cluster_arg, int64_t ntiles, const StageLayout L) {
  constexpr bool WS = kWarpSpecialised<C, ALIGNED, CLUSTER>;
  constexpr bool kTable = kRowTable<C> && ALIGNED;  // rows from the copy warp's table
  constexpr int V = 16 / sizeof(T);
  using R = Row<T, MK, BK, int>;
  using MaskT = typename R::MaskT;
  using BiasT = typename R::BiasT;
  // The logits stay in registers between the reduction and the write (C * V floats: 64 at most,
  // and 32 where mask / bias chunks need registers too), so a stage is released as soon as it is
  // read.
  static_assert(C == 8 || C == 4, "chunks per thread");
  static_assert(!RAW || raw_logits<MK, BK>, "raw logits only without added operands");
  static_assert(!WHOLE || (ALIGNED && CLUSTER && C == 8 && MK == MaskKind::kNone && BK == BiasKind::kNone),
                "WHOLE: aligned cluster rows without operands");
  // Who issues a tile's copies: the producer warp; in cluster rows every warp its share of the
  // block's pieces, after its own writes of the tile before (each warp's lane 0 arrives); else
  // warp 0. (Every warp issuing its run of the tile's rows lost 0.013 on gpt and 0.02 to 0.04 on
  // fp32-alibi; in cluster rows it gained 0.017 on decode-b8-k64k and 0.01 to 0.02 on k256k:
  // docs/perf.md, "After v24".)
  static_assert(CLUSTER || !WIDE, "wide rows take the cluster kernel");
  constexpr int NT = kComputeThreads<WIDE>;
  // Blocks that exchange partials and meet at cluster barriers: a wide block alone has none.
  const bool exchange = CLUSTER && (!WIDE || cluster_arg > 1);
  constexpr int kIssueParts = !WS && CLUSTER ? NT / 32 : 1;
  // Stages a block fills before its first tile: all of them; in cluster rows only the first, the
  // others once that tile has arrived. Every block asking for all its stages at once spread the
  // arrival of the first tiles over 5 to 12 us (a block's cluster waits for its last one); asked
  // for first, they arrive together, and the other stages' copies follow while they are worked on.
  constexpr int kStartStages = CLUSTER ? 1 : kMaxStages;
  // Rows of bulk_stores (softmax.h) write their outputs into the stage the tile was read from (each
  // chunk at its slot position, hidden ones as zeros) and send them to global memory with bulk
  // copies: per row, or with rows of more than a warp, per warp and chunk slot, 32 chunks each.
  // warp 0 then refills a stage one tile later, once those copies have read it. (kBulkOut, the
  // kernels that can take them at all, repeats part of bulk_stores at compile time: without it the
  // cluster kernels without operand tensors come out of ptxas with other register choices.)
  constexpr bool kBulkOut = ALIGNED && !CLUSTER && !WS;
  // Blocks of rows within a warp (rt <= 32) with bulk stores (both decided at run time), without a
  // cluster or producer warp and with a mask or bias tensor, release a stage to warp 0 through a
  // named barrier (kFreeBar + stage) instead of meeting at a block barrier each tile. (Rows of 8
  // threads lost 1 % with it, and the kernels without operand tensors, which rows wider than a
  // warp share, 1.4 % from their layout alone: docs/perf.md, "v39".)
  constexpr bool kFreeArrive = ALIGNED && !CLUSTER && !WS && (MK != MaskKind::kNone || BK != BiasKind::kNone);
  const bool bulk_out = kBulkOut && bulk_stores(C, rt, ALIGNED, CLUSTER, P.window);
  // WHOLE rows of raw logits (scale > 0) test no chunk at all: the slot positions of chunks past
  // the row's end, the same in every tile (every row has K keys) and never copied to, hold -inf
  // from the start. Such a chunk then adds nothing: fmaxf(m, -inf) = m, its exponentials are
  // exp2(-inf) = 0 and s + 0 = s (exactly as when it was skipped, so the same bits); only its
  // stores are skipped.
  constexpr bool kPadded = WHOLE && RAW;
  // kPadded rows of 16-bit scores take their maximum on the raw pairs, two keys an instruction
  // (max_pairs): every key of the slot is visible, or -inf, and the logit is the raw score.
  constexpr bool kPairMax = kPadded && sizeof(T) == 2;

  extern __shared__ __align__(128) uint8_t stage_mem[];
  __shared__ StagedScratch sh;
  __shared__ TileShape ts_shared;

  const int cluster = cluster_arg;  // 1 without CLUSTER (kept a runtime value: ptxas allocates better)
  const int tid = threadIdx.x;  // in a warp-specialised block, tid >= 256: the producer warp
  const int warp = tid >> 5;
  TileShape ts;
  ts.rt = rt;
  ts.rt_shift = __ffs(rt) - 1;
  ts.rows = NT >> ts.rt_shift;
  ts.slot = rt * C;
  ts.pieces = cluster > 1 ? C : 1;
  ts.cluster = cluster;
  ts.rank = cluster > 1 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  ts.nchunks = static_cast<int>((P.K + V - 1) / V);
  const int lane = tid & (rt - 1);
  const int row_in_tile = tid >> ts.rt_shift;
  const int64_t rows = P.B * P.H * P.Q;
  const int64_t unit = blockIdx.x / cluster;
  uint8_t* const row_table = kTable ? stage_mem + L.stages * L.stage_bytes : nullptr;
  const int64_t nunits = gridDim.x / cluster;

  timeline_mark(kTlEntry);
  if (tid == 0) {
    if constexpr (ALIGNED) {
      for (int s = 0; s < L.stages; ++s) mbar_init(smem_u32(&sh.full[s]), kIssueParts);
      ts_shared = ts;  // the copy warps read the tile shape from here, not from registers held all along
    }
    if (CLUSTER) sh.xc.init();
    mbar_fence_init();
  }
  // The other blocks of a cluster push into this block's barriers: they must see them set up.
  // Here a block of a cluster only arrives at the cluster barrier; it waits there before its first
  // exchange, so that its first copies are issued in between.
  if (CLUSTER || ALIGNED) __syncthreads();
  timeline_mark(kTlSetup);
  if (exchange) cluster_arrive_relaxed();  // (the inits are released by mbar_fence_init)
  if constexpr (WS) {
    if (tid >= kStagedThreads) {  // the producer warp
      produce_tiles<T, MK, BK>(P, ts_shared, L, ntiles, rows, sh, stage_mem, row_table);
      return;
    }
    if (unit < ntiles) bar_sync(kTableBar, kWsThreads);  // the first tile's table
  } else if constexpr (ALIGNED) {
    if (kIssueParts > 1 || warp == 0) {
      if constexpr (kStartStages < kMaxStages) {
        auto issue_stage = [&](int s) {
          const int64_t t = unit + s * nunits;
          if (t < ntiles)
            issue_tile<T, MK, BK, kTable, kIssueParts>(P, ts_shared, L, t, rows, stage_mem + s * L.stage_bytes,
                                                       smem_u32(&sh.full[s]), row_table + s * L.table_bytes,
                                                       kIssueParts > 1 ? warp : 0);
        };
        const int first = kStartStages < L.stages ? kStartStages : L.stages;
        for (int s = 0; s < first; ++s) issue_stage(s);
        timeline_mark(kTlIssued0);
        if (first < L.stages && unit < ntiles) {
          mbar_wait(smem_u32(&sh.full[0]), 0);  // the first tile is here (the loop's wait passes)
          for (int s = first; s < L.stages; ++s) issue_stage(s);
        }
      } else {
        for (int s = 0; s < L.stages; ++s) {
          const int64_t t = unit + s * nunits;
          if (t < ntiles)
            issue_tile<T, MK, BK, kTable, kIssueParts>(P, ts_shared, L, t, rows, stage_mem + s * L.stage_bytes,
                                                       smem_u32(&sh.full[s]), row_table + s * L.table_bytes,
                                                       kIssueParts > 1 ? warp : 0);
          if (s == 0) timeline_mark(kTlIssued0);
        }
      }
    }
    if (kTable) __syncthreads();  // the row tables of the first tiles are written
  }
  timeline_mark(kTlIssued);
  if constexpr (kPadded) {  // this thread's slots past the row's end, in every stage: -inf
    float pad[V];
#pragma unroll
    for (int e = 0; e < V; ++e) pad[e] = neg_inf();
    const uint4 pad_chunk = pack_chunk<T>(pad);
    for (int s = 0; s < L.stages; ++s) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        // (ts.chunk_of(c * rt + lane), in multiplications: through its shifts, 24 instructions more)
        if ((c * cluster + ts.rank) * rt + lane >= ts.nchunks)
          sts128(stage_mem + s * L.stage_bytes + static_cast<size_t>(c * rt + lane) * 16, pad_chunk);
      }
    }
  }

  int k = 0;           // tiles done by this block
  int s = 0;           // their stage
  uint32_t phase = 0;  // and the parity of the stage's barrier phase
  for (int64_t t = unit; t < ntiles; t += nunits, ++k) {
    // Slot position c * rt + lane holds chunk c * ch_step + ch_base of the row (recomputed per
    // tile from the launch parameters rather than held in registers across the loop).
    // (`rt` and `lane` are made opaque per tile: otherwise the C slot positions and chunk indices
    // are hoisted out of the tile loop, held in registers all along, and spilled.)
    int t_rt = rt, t_lane = lane;
    asm volatile("" : "+r"(t_rt), "+r"(t_lane));
    const int ch_base = ts.rank * t_rt + t_lane;
    const int ch_step = cluster * t_rt;
    const int64_t row = t * ts.rows + row_in_tile;
    // (A cluster row, or a wide block's, is its tile's one row, and t < ntiles: always active.)
    const bool active = CLUSTER || row < rows;
    // The row's span and pointers: from the copy warp's table of the tile's rows, or computed
    // here. (The copy warp wrote the table when it issued the tile, before a block barrier this
    // thread has passed since: the one after the first copies, or that of an earlier tile; and
    // overwrites it only after this tile's barrier. The producer warp of a warp-specialised block
    // wrote it before the named barrier of the previous tile, or the first one, and overwrites it
    // only after this tile's kFreeBar.)
    const R r = [&]() -> R {
      if constexpr (WHOLE) {
        return R(P, active ? row : 0, LinearRows{});
      } else if constexpr (kTable) {
        return reinterpret_cast<const R*>(row_table + s * L.table_bytes)[row_in_tile];
      } else {
        return R(P, active ? row : 0);
      }
    }();
    const uint8_t* stage = stage_mem + s * L.stage_bytes;
    const uint8_t* my_slot = stage + static_cast<size_t>(row_in_tile) * ts.slot * 16;
    // Where chunk c's operands are: at element (c * step + ofs) * V of `*_src`, a staged row (slot
    // position c * rt + lane) or the row in global memory (chunk c * ch_step + ch_base).
    const MaskT* mask_src = nullptr;
    const BiasT* bias_src = nullptr;
    int mask_step = ch_step, mask_ofs = ch_base, bias_step = ch_step, bias_ofs = ch_base;
    if constexpr (ALIGNED && (R::kMask || R::kBias)) {
      auto staged_row = [&](int mode) -> int {
        return mode == kOpPerRow ? row_in_tile : group_slot(P, mode, r, row_in_tile);
      };
      if (R::kMask && L.mask_mode != kOpGlobal) {
        const int row_bytes = ts.slot * V * static_cast<int>(sizeof(MaskT));
        mask_src = reinterpret_cast<const MaskT*>(stage + L.mask_off + staged_row(L.mask_mode) * row_bytes);
        mask_step = t_rt;
        mask_ofs = t_lane;
      } else {
        mask_src = r.mask;
      }
      if (R::kBias && L.bias_mode != kOpGlobal) {
        const int row_bytes = ts.slot * V * static_cast<int>(sizeof(BiasT));
        bias_src = reinterpret_cast<const BiasT*>(stage + L.bias_off + staged_row(L.bias_mode) * row_bytes);
        bias_step = t_rt;
        bias_ofs = t_lane;
      } else {
        bias_src = r.bias;
      }
    }

    bool vis[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int ch = c * ch_step + ch_base;
      vis[c] = kPadded || (active && ch < ts.nchunks && (WHOLE || r.visible(ch * V, V)));
    }
    // Whether some lane of the warp sees chunk c: the warp forms a chunk's logits, exponents and
    // outputs when one of its lanes does, so that the branches are the same in every lane (ptxas
    // puts no convergence barrier around them). A lane whose chunk is hidden then forms -inf
    // logits (hide_outside: its keys lie outside the row's span), exponents of 0 that add +0 to
    // its sum, and outputs 0 * factor, which are the hidden chunk's value: the same bits. (A lane
    // of a row past the last forms row 0's values, and stores nothing.) Not in the WHOLE kernels
    // whose slots past the row's end are not padded: they do not hide keys (HIDE = false below).
    // Not in warp-specialised blocks either: there ptxas laid out the kernel worse with the votes,
    // and bloom and decode-b64 took 5 % longer on an H200 (docs/perf.md, "After v39").
    constexpr bool kVoteVis = !WHOLE && !WS;
    bool wvis[C];
#pragma unroll
    for (int c = 0; c < C; ++c) wvis[c] = kVoteVis ? __any_sync(0xffffffffu, vis[c]) : vis[c];

    if constexpr (ALIGNED) mbar_wait(smem_u32(&sh.full[s]), phase);
    timeline_tile(k, 0);

    // Logits, kept in registers; then the partial of the row's lanes in this warp: the max over
    // their chunks (each thread's, then lane_max), e = exp(x - max) in place, and their sum. A
    // thread's max and sum run in 4 independent accumulators (element e goes to e % 4), combined
    // in a fixed order: short dependency chains.
    constexpr int A = 4;
    float kept[C][V];
    float acc[A];
#pragma unroll
    for (int a = 0; a < A; ++a) acc[a] = neg_inf();
    // kPairMax: the maxima of the chunks' four words. (Set in every kernel, 0 where unused: set
    // under `if constexpr` instead, ptxas allocated the general cluster kernels' registers otherwise.)
    uint32_t pair_max[4];
#pragma unroll
    for (int w = 0; w < 4; ++w) pair_max[w] = kPairMax ? neg_inf_pair<T>() : 0u;
    // Rows of 8 chunks a thread (at most one operand tensor) read the next chunk's scores and
    // operands before forming this chunk's logits, visible or not, so that a chunk's reads are in
    // flight while the previous chunk is formed (a hidden chunk reads its slot, within the stage,
    // and its operand row's first element: in bounds). Not with operand elements wider than the
    // scores' (float32 operands of 16-bit scores): their two chunks in flight spill registers.
    constexpr bool kHoist = ALIGNED && C == 8 && (!R::kMask || sizeof(MaskT) <= sizeof(T)) &&
                            (!R::kBias || sizeof(BiasT) <= sizeof(T));
    static_assert(!WHOLE || kHoist, "WHOLE kernels read ahead");
    uint4 raw[2];
    Vec<MaskT, V> mraw[2];
    Vec<BiasT, V> braw[2];
    auto read_chunk = [&](int c, int slot) {
      raw[slot] = lds128(my_slot + static_cast<size_t>(c * t_rt + t_lane) * 16);
      if constexpr (R::kMask) mraw[slot] = read_vec<V>(mask_src + (vis[c] ? c * mask_step + mask_ofs : 0) * V);
      if constexpr (R::kBias) braw[slot] = read_vec<V>(bias_src + (vis[c] ? c * bias_step + bias_ofs : 0) * V);
    };
    if constexpr (kHoist) read_chunk(0, 0);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if constexpr (kHoist) {
        if (c + 1 < C) read_chunk(c + 1, (c + 1) & 1);
      }
      if (!wvis[c]) continue;
      const int j0 = (c * ch_step + ch_base) * V;
      if constexpr (kHoist) {
        float sv[V];
        unpack_chunk<T>(raw[c & 1], sv);
        chunk_logits_vals<T, MK, BK, V, int, RAW, !WHOLE, kVoteVis>(P, r, j0, sv, mraw[c & 1], braw[c & 1], kept[c]);
      } else if constexpr (ALIGNED) {
        float sv[V];
        unpack_chunk<T>(lds128(my_slot + static_cast<size_t>(c * t_rt + t_lane) * 16), sv);
        // (A lane whose chunk is hidden reads its operand rows' first chunk: in bounds, as above.)
        const int mi = vis[c] ? c * mask_step + mask_ofs : 0, bi = vis[c] ? c * bias_step + bias_ofs : 0;
        chunk_logits_from<T, MK, BK, V, int, RAW, kVoteVis>(P, r, j0, sv, mask_src + mi * V, bias_src + bi * V, kept[c]);
      } else {
        chunk_logits_strided<T, MK, BK, V, int, RAW>(P, r, j0, kept[c]);
      }
      if constexpr (kPairMax) {
        pair_max[0] = max_pairs<T>(pair_max[0], raw[c & 1].x);
        pair_max[1] = max_pairs<T>(pair_max[1], raw[c & 1].y);
        pair_max[2] = max_pairs<T>(pair_max[2], raw[c & 1].z);
        pair_max[3] = max_pairs<T>(pair_max[3], raw[c & 1].w);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e % A] = fmaxf(acc[e % A], kept[c][e]);
      }
    }
    // This warp is done with the stage and its table: the producer may refill them (if it will).
    if (WS && t + L.stages * nunits < ntiles) bar_arrive(kFreeBar + s, kWsThreads);
    MS st{fmaxf(fmaxf(acc[0], acc[1]), fmaxf(acc[2], acc[3])), 0.0f};
    if constexpr (kPairMax)
      st.m = max_of_pair<T>(
          max_pairs<T>(max_pairs<T>(pair_max[0], pair_max[1]), max_pairs<T>(pair_max[2], pair_max[3])));
    if constexpr (RAW) st.m = __fmul_rn(st.m, P.layer_scale);  // the largest logit
    // The lanes of the row in this warp take their maximum first, and every lane's exponents are
    // taken relative to it: their sums then add without rescaling. (Merging the lanes' (max, sum)
    // pairs took two exponentials and about 20 instructions a butterfly step.)
    const int width = CLUSTER || rt >= 32 ? 32 : rt;
    st.m = lane_max(st.m, width);
    {
      const float shift = ms_shift(st.m) * kLog2e;
      const float to_log2 = RAW ? __fmul_rn(P.layer_scale, kLog2e) : kLog2e;  // log2 e a raw score
#pragma unroll
      for (int a = 0; a < A; ++a) acc[a] = 0.0f;
      float sh = shift, to_log2_k = to_log2;
      // A row of huge logits: the difference first (common.cuh). The warp votes first: a branch on
      // the vote is the same in every lane, so ptxas puts no convergence barrier around it. (With
      // the test in each lane alone, ptxas laid out the whole kernel around that barrier, and BLOOM
      // prefill took 2 % longer on an H200: docs/perf.md, "v38".)
      const bool huge = needs_exact_shift(shift);
      if (__any_sync(0xffffffffu, huge) && huge) {
#pragma unroll
        for (int c = 0; c < C; ++c) {
          if (!vis[c]) continue;
#pragma unroll
          for (int e = 0; e < V; ++e)
            kept[c][e] = __fsub_rn(RAW ? __fmul_rn(kept[c][e], P.layer_scale) : kept[c][e], st.m);
        }
        sh = 0.0f;
        to_log2_k = kLog2e;
      }
#pragma unroll
      for (int c = 0; c < C; ++c) {
        if (!wvis[c]) continue;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          kept[c][e] = fast_exp2(fmaf(kept[c][e], to_log2_k, -sh));
          acc[e % A] += kept[c][e];
        }
      }
      st.s = lane_sum((acc[0] + acc[1]) + (acc[2] + acc[3]), width);
      // A largest logit of +inf (the scale's product overflows) makes the row NaN, as the exponent
      // of a scaled +inf logit does without RAW.
      if (RAW && st.m == -neg_inf()) st.s = __int_as_float(0x7fc00000);
    }
    const float local_max = st.m;  // this warp's part of the row

    // Reduce: the warps of the row (rt > 32), then the blocks of the cluster.
    const bool block_rows = CLUSTER || rt > 32;
    // The refill after this tile: tile t2 into stage sp (with bulk_out the stage of the tile
    // before, one tile later, once its outputs have left it), and whether there is one.
    const int sp = bulk_out ? (s == 0 ? L.stages - 1 : s - 1) : s;
    const int64_t t2 = (bulk_out ? t - nunits : t) + L.stages * nunits;
    const bool refills = t2 < ntiles && (!bulk_out || k > 0);
    const bool release = kFreeArrive && bulk_out && !block_rows;  // a named barrier, not the block's
    const int par = k & 1;
    if (block_rows && (tid & 31) == 0) {
      sh.warp_max[par][warp] = st.m;
      sh.warp_sum[par][warp] = st.s;
    }
    if constexpr (WS) {
      // The compute warps meet; where the block has a next tile, with the producer's arrival
      // after it wrote that tile's table.
      if (t + nunits < ntiles) {
        bar_sync(kTableBar + (s + 1 == L.stages ? 0 : s + 1), kWsThreads);
      } else {
        bar_sync(kComputeBar, kStagedThreads);
      }
    } else if (block_rows || ALIGNED) {
      if (bulk_out && k > 0) bulk_wait_read();  // the outputs of the tile before have left its stage
      if (release) {
        // Rows within a warp: no warp waits for another. The warps other than warp 0 tell it that
        // they are done with the stage it refills next (as the compute warps of warp-specialised
        // blocks tell their producer), and warp 0 waits for them only before that refill.
        if (warp != 0 && refills) {
          __syncwarp();
          bar_arrive(kFreeBar + sp, NT);
        }
      } else {
        __syncthreads();
      }
    }
    if (block_rows) {
      const int w0 = row_in_tile * (rt >> 5);
      // (A cluster row has all of the block's NT / 32 warps.)
      st = CLUSTER ? combine_warps_max_first<NT / 32>(sh.warp_max[par], sh.warp_sum[par])
                   : combine_warps(sh.warp_max[par], sh.warp_sum[par], w0, rt >> 5);
    }
    timeline_tile(k, 1);
    if (exchange) {
      if (k == 0) cluster_wait();  // every block of the cluster has set up its barriers
      st = sh.xc.combine(st, cluster, ts.rank, k);
    }
    timeline_tile(k, 2);

    // Write: every chunk of the slice, zeros where hidden.
    const Normaliser norm(st);
    // Kept e = exp(x - local_max): out = e * exp(local_max - max) / sum.
    const float factor =
        fast_exp2((local_max - ms_shift(st.m)) * kLog2e) * norm.inv;
    // A hidden chunk's output, packed once a tile, and one store in each branch: where each key
    // chose between its product and the hidden value, ptxas moved the hidden value into V
    // registers and issued the V products predicated, for hidden chunks too. (Written out here:
    // formed through Normaliser::hidden_chunk, the same instructions are scheduled differently in
    // most of the 8-chunk kernels.)
    float hid[V];
#pragma unroll
    for (int e = 0; e < V; ++e) hid[e] = norm.hidden;
    const uint4 hidden_chunk = pack_chunk<T>(hid);
    if (bulk_out) {
      // (No cluster: chunk c * rt + lane is at slot position c * rt + lane.)
      uint8_t* const out_slot = stage_mem + s * L.stage_bytes + static_cast<size_t>(row_in_tile) * ts.slot * 16;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int ch = c * t_rt + t_lane;
        if (!active || ch >= ts.nchunks) continue;
        uint4 v = hidden_chunk;
        if (wvis[c]) {
          float y[V];
#pragma unroll
          for (int e = 0; e < V; ++e) y[e] = kept[c][e] * factor;
          v = pack_chunk<T>(y);
        }
        sts128(out_slot + static_cast<size_t>(ch) * 16, v);
      }
      fence_proxy_async_smem();
      __syncwarp();
      const int wl = tid & 31;
      if (t_rt <= 32) {
        // The row's lanes are in this warp: its first lane sends the whole row.
        if (active && t_lane == 0) {
          const int n = ts.slot < ts.nchunks ? ts.slot : ts.nchunks;
          bulk_store(r.out, smem_u32(out_slot), static_cast<uint32_t>(n) * 16u, l2_policy<true>());
          bulk_commit();
        }
      } else if (active && wl < C) {
        // This warp holds slot positions c * rt + first + [0, 32) of its row: lane c sends them.
        const int p0 = wl * t_rt + (t_lane - wl);
        const int n = ts.nchunks - p0 < 32 ? ts.nchunks - p0 : 32;
        if (n > 0) {
          bulk_store(r.out + static_cast<size_t>(p0) * V, smem_u32(out_slot + static_cast<size_t>(p0) * 16),
                     static_cast<uint32_t>(n) * 16u, l2_policy<true>());
          bulk_commit();
        }
      }
    }
    if constexpr (kPadded) {
      // Every chunk has its product; those past the row's end are not stored. (The chunk's address
      // from one pointer a tile: formed from row * K for each chunk, it took 8 instructions.)
      T* const out0 = r.out + static_cast<size_t>(ch_base) * V;
      const int step = ch_step * V;
#pragma unroll
      for (int c = 0; c < C; ++c) {
        float y[V];
#pragma unroll
        for (int e = 0; e < V; ++e) y[e] = kept[c][e] * factor;
        store_streaming_if(c * ch_step + ch_base < ts.nchunks, out0 + c * step, pack_chunk<T>(y));
      }
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int ch = c * ch_step + ch_base;
      if (kPadded || bulk_out || !active || ch >= ts.nchunks) continue;
      if constexpr (ALIGNED) {
        if (wvis[c]) {
          float y[V];
#pragma unroll
          for (int e = 0; e < V; ++e) y[e] = kept[c][e] * factor;
          store_streaming(r.out + ch * V, pack_chunk<T>(y));
        } else {
          store_streaming(r.out + ch * V, hidden_chunk);
        }
      } else {
        float y[V];
        if (wvis[c]) {
#pragma unroll
          for (int e = 0; e < V; ++e) y[e] = kept[c][e] * factor;
        } else {
#pragma unroll
          for (int e = 0; e < V; ++e) y[e] = norm.hidden;
        }
        store_strided<T, V, int>(r.out, P.out_stride[3], ch * V, static_cast<int>(P.K), y);
      }
    }
    timeline_tile(k, 3);
    if constexpr (ALIGNED) {
      // Every thread was done with stage s at the barrier above (or, where the warps release it,
      // at warp 0's wait below): refill it. (Here, not right after the barrier, where the copy
      // warp's work would add to the registers that hold the logits.) With bulk_out, the stage of
      // the tile before instead: every thread's bulk stores of it had read it before the barrier.
      if constexpr (WHOLE) {
        if (t2 < ntiles)
          issue_linear_piece<T>(P, ts_shared, t2, stage_mem + sp * L.stage_bytes, smem_u32(&sh.full[sp]), warp);
      } else if (!WS && (kIssueParts > 1 || warp == 0) && refills) {
        if (release) bar_sync(kFreeBar + sp, NT);  // every warp is done with stage sp
        issue_tile<T, MK, BK, kTable, kIssueParts>(P, ts_shared, L, t2, rows, stage_mem + sp * L.stage_bytes,
                                                   smem_u32(&sh.full[sp]), row_table + sp * L.table_bytes,
                                                   kIssueParts > 1 ? warp : 0);
      }
      if (++s == L.stages) {
        s = 0;
        phase ^= 1u;
      }
    }
  }
  if (bulk_out) bulk_wait();  // the last tiles' outputs have left shared memory
  // No block of a cluster may exit while another can still write to its shared memory. (Every
  // unit has a tile, so every block has waited for the arrival above.) Every partial a block is
  // sent has landed (it waited for them on its exchange barrier), so the arrival releases nothing:
  // relaxed, without a GPU-wide memory barrier that would wait for the block's last stores.
  if (exchange) {
    cluster_arrive_relaxed();
    cluster_wait();
  }
  timeline_mark(kTlDone);
}

}  // namespace detail
}  // namespace tp_softmax
