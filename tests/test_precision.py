"""``--precision auto``: bf16 only with native bf16 matmul (issue 12), decided on faked capabilities."""
from __future__ import annotations

import warnings

import pytest
import torch

from mmil import precision as P
from mmil.errors import MMILInputError


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("native", [True, False])
def test_choice_table(device_type, native):
    assert P.choose_precision("auto", device_type, native_bf16=native) == ("bf16" if native else "fp32", None)
    assert P.choose_precision("fp32", device_type, native_bf16=native) == ("fp32", None)
    chosen, warning = P.choose_precision("bf16", device_type, native_bf16=native)
    assert chosen == "bf16" and (warning is None) == native
    if not native:
        assert "slower than fp32" in warning and "--precision" in warning


def test_unknown_precision_is_an_input_error():
    with pytest.raises(MMILInputError, match="fp16"):
        P.choose_precision("fp16", "cpu", native_bf16=True)


@pytest.mark.parametrize("flags, capability, expected", [
    ({"avx2", "fma"}, "AVX2", False),
    ({"avx2", "avx512f", "avx512bw"}, "AVX512", False),
    ({"avx512f", "avx512_bf16"}, "AVX512", True),
    ({"avx512f", "amx_tile", "amx_bf16"}, "AVX512", True),
    (set(), "AMX", True),  # flags unreadable, torch reports AMX
    (set(), "", False),
])
def test_cpu_capability(flags, capability, expected):
    assert P.cpu_has_native_bf16(flags, capability) is expected


def test_cpu_flags_read_from_a_cpuinfo_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert P.cpu_flags(info) == frozenset({"fpu", "avx2", "amx_bf16", "amx_tile"})
    assert P.cpu_flags(tmp_path / "missing") == frozenset()


def test_resolve_says_once_and_warns_once(monkeypatch, capsys):
    monkeypatch.setattr(P, "_said", set())
    monkeypatch.setattr(P, "native_bf16", lambda device: False)
    assert P.resolve_precision("auto", "cpu") == "fp32"
    assert P.resolve_precision("auto", "cpu") == "fp32"
    err = capsys.readouterr().err
    assert err.count("--precision auto -> fp32") == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert P.resolve_precision("bf16", "cpu") == "bf16"
        assert P.resolve_precision("bf16", "cpu") == "bf16"
    assert len([w for w in caught if "slower than fp32" in str(w.message)]) == 1
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    assert P.resolve_precision("auto", "cuda:3") == "bf16"
    assert "--precision auto -> bf16 on cuda:3" in capsys.readouterr().err


def test_autocast_follows_the_decision(monkeypatch):
    from mmil.evaluate import autocast

    monkeypatch.setattr(P, "_said", set())
    for native, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(P, "native_bf16", lambda device, native=native: native)
        a = torch.ones(4, 4)
        with autocast(torch.device("cpu"), "auto"):
            assert (a @ a).dtype == dtype


def test_resume_fingerprint_holds_the_effective_precision(monkeypatch):
    """A run made with fp32 resumes under auto where auto means fp32, and not where auto means bf16."""
    from mmil.config import TrainConfig
    from mmil.train_state import fingerprint

    def prints(precision: str) -> dict:
        return fingerprint("abmil", {}, TrainConfig(precision=precision, device="cpu"), ["a"], ["b"])

    monkeypatch.setattr(P, "native_bf16", lambda device: False)
    assert prints("auto") == prints("fp32") and prints("bf16") != prints("fp32")
    monkeypatch.setattr(P, "native_bf16", lambda device: True)
    assert prints("auto") == prints("bf16") != prints("fp32")
