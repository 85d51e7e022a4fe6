"""The public face: what a user imports, and that each public function documents itself."""

import inspect

import tritium
import tritium.nf4


def test_nf4_is_a_module():
    from tritium.nf4 import NF4Linear, dequantize, matmul, quantize

    assert inspect.ismodule(tritium.nf4)
    assert {quantize, matmul, dequantize} <= {getattr(tritium.nf4, n) for n in tritium.nf4.__all__}
    assert NF4Linear.__module__ == "tritium.models.nf4_linear"


def test_every_public_name_exists_and_is_documented():
    for module in (tritium, tritium.nf4):
        for name in module.__all__:
            value = getattr(module, name)
            if callable(value):
                assert inspect.getdoc(value), f"{module.__name__}.{name} has no docstring"
