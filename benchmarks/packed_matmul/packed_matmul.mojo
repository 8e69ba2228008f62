# Two MAX custom ops for benchmarks/bench_matmul.py: a matmul whose weight was packed once, ahead of
# time, into the layout MAX's CPU matmul kernel works in, and the op that packs it. MAX's own
# `ops.matmul` packs tiles of B on every call instead.
#
# The packed weight must be 64-byte aligned: the kernel loads it with aligned AVX-512 loads.
import extensibility
from extensibility import InputTensor, OutputTensor
from linalg.matmul.cpu import matmul as matmul_cpu
from linalg.packing import pack_b_ndbuffer, pack_matmul_b_shape_func
from max.gpu.host import DeviceContext


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
