# Two MAX custom ops for benchmarks/bench_matmul.py: a matmul whose weight was packed once, ahead of
# time, into the layout MAX's CPU matmul kernel works in, and the op that packs it. MAX's own
# `ops.matmul` packs tiles of B on every call instead.
#
# The packed weight must be 64-byte aligned: the kernel loads it with aligned AVX-512 loads.
import extensibility
from extensibility import InputTensor, OutputTensor
from linalg.matmul.cpu import matmul as matmul_cpu
from linalg.packing import pack_b_ndbuffer, pack_matmul_b_shape_func
from max.algorithm import sync_parallelize
from max.gpu.host import DeviceContext
from std.memory import stack_allocation
from std.utils import StaticTuple


@extensibility.register("bench_packed_b_shape")
struct PackedBShape:
    """The [rows, cols] of the packed form of a [K, N] weight, for a matmul with `m` rows."""

    @staticmethod
    def execute[target: StaticString, m: Int](
        shape: OutputTensor[dtype=DType.int64, rank=1, ...],
        b: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var packed = pack_matmul_b_shape_func[DType.float32, DType.float32, False](
            b.to_tile_tensor[DType.int64](), m
        )
        var out = shape.to_tile_tensor[DType.int64]()
        out.ptr.unsafe_store(0, Int64(packed[0]))
        out.ptr.unsafe_store(1, Int64(packed[1]))


@extensibility.register("bench_pack_b")
struct PackB:
    """Packs a [K, N] weight for a matmul with `m` rows (run once, when the weights are loaded)."""

    @staticmethod
    def execute[target: StaticString, m: Int](
        packed: OutputTensor[dtype=DType.float32, rank=2, ...],
        b: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        pack_b_ndbuffer[DType.float32, DType.float32](
            b.to_tile_tensor[DType.int64](), packed.to_tile_tensor[DType.int64](), m
        )


@extensibility.register("bench_matmul_packed_b")
struct MatmulPackedB:
    """The product [m, N] of a [m, K] and a weight packed by bench_pack_b for the same m."""

    @staticmethod
    def execute[target: StaticString, m: Int](
        c: OutputTensor[dtype=DType.float32, rank=2, ...],
        a: InputTensor[dtype=DType.float32, rank=2, ...],
        b: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        matmul_cpu[b_packed=True](
            c.to_tile_tensor[DType.int64](),
            a.to_tile_tensor[DType.int64](),
            b.to_tile_tensor[DType.int64](),
            m,
        )


# ---------------------------------------------------------------------------------------------
# Our own kernel, for comparison: the weight is packed once (by numpy) into panels of 32 columns,
# [N / 32, K, 32], like onnxruntime's MLAS packs it. Each of `tasks` threads takes a range of panels.
# Blocks of 12 rows x 256 steps of the activation are copied into a small contiguous buffer first:
# read in place, rows whose stride is a multiple of 4 KiB (K = 3072) all map to the same L1 sets.

comptime W = 16                 # floats per AVX-512 register
comptime NR = 32                # columns per panel: two registers
comptime MR = 12                # rows per micro-kernel call: 24 accumulators
comptime KC = 256               # steps of K per block (an A block of 12 KiB stays in L1)
comptime NC = 384               # columns per block (a B block of 384 KiB stays in L2)
comptime V = SIMD[DType.float32, W]
comptime P = Pointer[Float32, MutUntrackedOrigin]


@always_inline
def _micro[rows: Int](a: P, b: P, c: P, ldc: Int, k_len: Int, first: Bool):
    """c[rows, 32] (+)= a x b over k_len steps; a is packed as a[k * MR + r], b as b[k * 32 + j]."""
    var acc0 = StaticTuple[V, rows](fill=V(0))
    var acc1 = StaticTuple[V, rows](fill=V(0))
    if not first:
        comptime for r in range(rows):
            acc0[r] = c.unsafe_load[width=W](r * ldc)
            acc1[r] = c.unsafe_load[width=W](r * ldc + W)
    for k in range(k_len):
        var b0 = b.unsafe_load[width=W](k * NR)
        var b1 = b.unsafe_load[width=W](k * NR + W)
        comptime for r in range(rows):
            var av = V(a.unsafe_load(k * MR + r))
            acc0[r] = av.fma(b0, acc0[r])
            acc1[r] = av.fma(b1, acc1[r])
    comptime for r in range(rows):
        c.unsafe_store(r * ldc, acc0[r])
        c.unsafe_store(r * ldc + W, acc1[r])


@extensibility.register("bench_gemm_panels")
struct GemmPanels:
    """c[m, N] = a[m, K] x b, with b packed as [N / 32, K, 32] (N a multiple of 32)."""

    @staticmethod
    def execute[target: StaticString, tasks: Int](
        c: OutputTensor[dtype=DType.float32, rank=2, ...],
        a: InputTensor[dtype=DType.float32, rank=2, ...],
        b: InputTensor[dtype=DType.float32, rank=3, ...],
        ctx: DeviceContext,
    ) raises:
        var m = a.dim_size(0)
        var k_len = a.dim_size(1)
        var n = c.dim_size(1)
        var panels = n // NR
        var ap = a.to_tile_tensor[DType.int64]().ptr
        var bp = b.to_tile_tensor[DType.int64]().ptr
        var cp = c.to_tile_tensor[DType.int64]().ptr
        var per_task = (panels + tasks - 1) // tasks

        def task(t: Int) {imm}:
            var buf = P(unsafe_from_address=Int(stack_allocation[MR * KC, DType.float32, alignment=64]()))
            var j_end = min(panels, (t + 1) * per_task)
            var jb = t * per_task
            while jb < j_end:
                var je = min(j_end, jb + NC // NR)
                var k0 = 0
                while k0 < k_len:
                    var kl = min(KC, k_len - k0)
                    var row = 0
                    while row < m:
                        var rows = min(MR, m - row)
                        for r in range(rows):
                            var src = ap + (row + r) * k_len + k0
                            for k in range(kl):
                                buf.unsafe_store(k * MR + r, src.unsafe_load(k))
                        for j in range(jb, je):
                            var b_blk = bp + (j * k_len + k0) * NR
                            var c_blk = cp + row * n + j * NR
                            comptime for r in range(1, MR + 1):
                                if rows == r:
                                    _micro[r](buf, b_blk, c_blk, n, kl, k0 == 0)
                        row += MR
                    k0 += KC
                jb = je

        sync_parallelize(task, tasks)
