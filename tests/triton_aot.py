"""Compile every fastopt Triton kernel for a GPU architecture with the real Triton compiler,
without a GPU (run by test_triton_aot.py in a process without TRITON_INTERPRET).

    python tests/triton_aot.py 90

The interpreter that runs the kernels in CI accepts programs the compiler refuses (it caught a
loop variable whose type changed between loops); this catches those before a GPU session does.
"""

from __future__ import annotations

import itertools
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastopt.triton_kernels import adagrad, adam, batch_norm_relu, norm, rmsprop, sgd  # noqa: E402
from fastopt.triton_kernels.launch import STORES  # noqa: E402
from fastopt.triton_kernels.multi_tensor import BLOCK, CHUNK  # noqa: E402

# Pointer arguments and their element types; every other non-constexpr argument is a float,
# except n_chunks.
POINTERS = {
    "tensor_of_chunk": "*i32", "start_of_chunk": "*i64", "numels": "*i64", "chunks": "*i64", "per_tensor": "*i64",
    "done": "*i32", "step_ptrs": "*i64", "lr_ptr": "*fp32", "grad_scale_ptr": "*fp32", "clip_coef_ptr": "*fp32",
    "found_inf_ptr": "*fp32", "partials": "*fp32", "counter": "*i32", "out": "*fp32",
}
COMMON_FLAGS = ("LR_IS_PTR", "MAXIMIZE", "MASTER", "HAS_SCALE", "HAS_CLIP", "HAS_COEF", "HAS_FOUND_INF")
KERNELS = {
    adam._adam_kernel: ("L2", "DECOUPLED", "AMSGRAD"),
    adagrad._adagrad_kernel: ("L2",),
    rmsprop._rmsprop_kernel: ("L2", "CENTERED", "MOMENTUM"),
    sgd._sgd_kernel: ("L2", "MOMENTUM", "NESTEROV"),
}


# Instructions that must not appear in the PTX of the update kernels (Note [exact math in Triton]):
# approximate division, square root, exp and reciprocal (`.approx`), and `div.full` (2 ulp).
INEXACT = (".approx", "div.full")


BASES = {"p_base": "P_DTYPE", "g_base": "G_DTYPE", "out_base": "OUT_DTYPE", "s_base": "S_DTYPE"}
WIDE = ("ld.global.v4.b32", "ld.global.v2.b64")  # 16-byte loads: 4 fp32 or 8 bf16/fp16; 2 fp64
PTR_NAMES = {tl.float32: "*fp32", tl.float16: "*fp16", tl.bfloat16: "*bf16", tl.float64: "*fp64"}


def compile_one(fn, constexprs: dict, target: GPUTarget, types: dict = None):
    types = {**{k: PTR_NAMES[constexprs[d]] for k, d in BASES.items() if k in fn.arg_names}, **(types or {})}
    signature = {}
    annotated = {p.name: p.annotation_type for p in fn.params if p.annotation_type}
    for name in fn.arg_names:
        if types and name in types:
            signature[name] = types[name]
        elif name in annotated:
            signature[name] = annotated[name]
        elif name in constexprs:
            signature[name] = "constexpr"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name.endswith("_ptrs"):
            signature[name] = "*i64"
        elif name == "n_chunks":
            signature[name] = "i32"
        else:
            signature[name] = "fp32"
    # the slot bases of Note [aligned bodies] (common.py): 16-byte aligned, as Triton specializes
    # such an argument at a launch
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in BASES if k in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=target, options={"enable_fp_fusion": False})


def inexact_instructions(ptx: str) -> list[str]:
    return [line.strip() for line in ptx.splitlines() if any(word in line for word in INEXACT)]


def _check(kernel, fn, what) -> None:
    """An update kernel's PTX: exact math only, and 16-byte loads (Note [aligned bodies])."""
    bad = inexact_instructions(kernel.asm["ptx"])
    if bad:
        raise SystemExit(f"{fn.__name__} ({what}) has inexact instructions: {bad[:5]}")
    if not any(w in kernel.asm["ptx"] for w in WIDE):
        raise SystemExit(f"{fn.__name__} ({what}): no 16-byte loads (Note [aligned bodies])")


def main(arch: int) -> None:
    target = GPUTarget("cuda", arch, 32)
    count = 0
    for fn, flags in KERNELS.items():
        for on, (p_dtype, g_dtype) in itertools.product(
            (True, False), ((tl.float32, tl.float32), (tl.float32, tl.bfloat16), (tl.float16, tl.float16),
                            (tl.float64, tl.float64))
        ):
            values = {f: on for f in COMMON_FLAGS + flags}
            values["MASTER"] = on and g_dtype != p_dtype
            compute = tl.float64 if p_dtype == tl.float64 else tl.float32
            kernel = compile_one(fn, {"COMPUTE": compute, "P_DTYPE": p_dtype, "G_DTYPE": g_dtype, "OUT_DTYPE": g_dtype,
                                      "S_DTYPE": p_dtype, "STOCHASTIC": False, "STORE": STORES[None],
                                      "BLOCK": BLOCK, **values}, target)
            _check(kernel, fn, (p_dtype, g_dtype, values))
            count += 1
        # the low-precision stores (Note [stochastic stores in Triton], common.py): bf16 state
        # with float32 params and with masters; bf16/fp16 params with a Kahan buffer (params_out)
        # and bf16 state or not; bf16 params rounded stochastically
        for on, (p_dtype, g_dtype, stochastic, store) in itertools.product(
            (True, False), ((tl.float32, tl.float32, True, None), (tl.float32, tl.bfloat16, True, None),
                            (tl.bfloat16, tl.bfloat16, True, "kahan"), (tl.float16, tl.float16, False, "kahan"),
                            (tl.bfloat16, tl.bfloat16, True, "stochastic"))
        ):
            values = {f: on for f in COMMON_FLAGS + flags}
            values["MASTER"] = g_dtype != p_dtype
            kernel = compile_one(fn, {"COMPUTE": tl.float32, "P_DTYPE": p_dtype, "G_DTYPE": g_dtype,
                                      "OUT_DTYPE": g_dtype, "S_DTYPE": tl.bfloat16 if stochastic else p_dtype,
                                      "STOCHASTIC": stochastic, "STORE": STORES[store], "BLOCK": BLOCK,
                                      **values}, target)
            _check(kernel, fn, (p_dtype, g_dtype, stochastic, store, values))
            count += 1
    for l2, on, (g_dtype, acc, acc_ptr) in itertools.product(
        (True, False), (True, False), ((tl.bfloat16, tl.float32, "*fp32"), (tl.float64, tl.float64, "*fp64"))
    ):
        kernel = compile_one(norm._norm_kernel, {"ACC": acc, "G_DTYPE": g_dtype, "L2": l2, "HAS_SCALE": on,
                                                 "HAS_CLIP": on, "WRITE_COEF": on, "CHUNK": CHUNK, "BLOCK": BLOCK,
                                                 "RBLOCK": norm.RBLOCK},
                             target, {"partials": acc_ptr, "out": acc_ptr})
        if not any(w in kernel.asm["ptx"] for w in WIDE):
            raise SystemExit(f"_norm_kernel ({g_dtype}): no 16-byte loads (Note [aligned bodies])")
        count += 1
    bn = batch_norm_relu
    for grad, channels_last, on, (dtype, name) in itertools.product(
        (False, True), (False, True), (False, True),
        ((tl.float32, "fp32"), (tl.bfloat16, "bf16"), (tl.float16, "fp16"), (tl.float64, "fp64")),
    ):
        acc, stat = (tl.float64, "*fp64") if dtype == tl.float64 else (tl.float32, "*fp32")
        types = {"x_ptr": f"*{name}", "dy_ptr": f"*{name}", "out_ptr": f"*{name}", "part_ptr": stat,
                 "counter_ptr": "*i32", "N": "i32", "C": "i32", "S": "i32", "SPLITS": "i32",
                 **{v: stat for v in ("w_ptr", "b_ptr", "mean_ptr", "invstd_ptr", "rm_ptr", "rv_ptr", "vec_ptr",
                                      "dw_ptr", "db_ptr")}}
        block_c, block_j = bn._blocks(64, 49, channels_last)
        flags = {"CHANNELS_LAST": channels_last, "HAS_WEIGHT": on, "HAS_BIAS": on, "ACC": acc, "BLOCK_C": block_c,
                 "BLOCK_J": block_j}
        compile_one(bn._bn_relu_sums_kernel, {"GRAD": grad, "TRAINING": on or not grad, "HAS_RM": on, "HAS_RV": on,
                                              **flags}, target, types)
        compile_one(bn._bn_relu_apply_kernel, {"GRAD": grad, "EVAL": on and not grad, "OUT_DTYPE": dtype, **flags},
                    target, types)
        count += 2
    print(f"compiled {count} kernel specializations for sm_{arch}; the update kernels' PTX has no "
          f"{' or '.join(INEXACT)} instruction, and they and the norm kernel load 16 bytes at a time")


if __name__ == "__main__":
    main(int(sys.argv[1]))
