"""The float32 copies of bfloat16 parameters that XLA:CPU makes and an accelerator does not.

XLA:CPU computes a bfloat16 dot in float32: it converts both operands. When the weight is a slice of a scanned
stack, the compiler converts the whole stack once, before the loop, and keeps the float32 copy alive through
the forward and backward loops: a LoRA run of an 8B model with its base in bfloat16 plans about 30 GB more
than it needs on a GPU or TPU, whose dots take bfloat16 operands. These copies are recognisable in the
optimised program: a top-level convert of a bfloat16 entry parameter to float32 of the same shape that the
compiler inserted (it carries no `op_name` of a JAX operation, unlike a conversion the program asked for).
"""

from __future__ import annotations

import math
import re

_COMPUTATION = re.compile(r"^(ENTRY )?(%[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", re.M | re.S)
_PARAMETER = re.compile(r"^\s*(%[\w.\-]+) = bf16\[([\d,]*)\]\{[^}]*\} parameter\(\d+\)", re.M)
_UPCAST = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = f32\[([\d,]*)\](?:\{[^}]*\})? (convert|fusion)\((%[\w.\-]+)\)(.*)$",
                     re.M)
_CALLS = re.compile(r"calls=(%[\w.\-]+)")


def _inserted_convert(body: str) -> bool:
    """Whether a fused computation is one compiler-inserted convert of its only parameter."""
    lines = [line.strip() for line in body.splitlines() if line.strip()]
    return (len(lines) == 2 and " parameter(0)" in lines[0] and lines[1].startswith("ROOT ")
            and " convert(" in lines[1] and "op_name=" not in lines[1])


def cpu_upcast_bytes(hlo_text: str) -> int:
    """Bytes of the float32 copies of bfloat16 entry parameters that the compiler inserted in `hlo_text` (an
    optimised HLO module, `compiled.as_text()`); 0 for a program without any."""
    computations = {name: (bool(entry), body) for entry, name, body in _COMPUTATION.findall(hlo_text)}
    entry = next((body for is_entry, body in computations.values() if is_entry), "")
    params = dict(_PARAMETER.findall(entry))
    total = 0
    for dims, op, operand, rest in _UPCAST.findall(entry):
        if params.get(operand) != dims:
            continue
        if op == "convert":
            inserted = "op_name=" not in rest
        else:
            called = _CALLS.search(rest)
            inserted = bool(called) and _inserted_convert(computations.get(called.group(1), (False, ""))[1])
        if inserted:
            total += 4 * math.prod(int(d) for d in dims.split(",") if d)
    return total
