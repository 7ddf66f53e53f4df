"""Each detector of the emulator, proven on a planted-bug kernel (tests/emu/planted.cu)."""
import pytest
import torch
from conftest import SCHEDULES, under_schedules

import harness


def result(report: str) -> str:
    return report.rsplit("result ", 1)[1]


def findings(report: str) -> str:
    return report.rsplit("result ", 1)[0]


def test_correct_kernel_has_no_finding_under_any_schedule(emu):
    runs = []
    for s in SCHEDULES:
        with emu.device(schedule=s):
            r = emu.planted("correct")
        assert findings(r) == "", findings(r)
        runs.append(result(r))
    assert len(set(runs)) == 1


@pytest.mark.skipif(not harness.ASAN, reason="out-of-bounds detection needs the AddressSanitizer build")
@pytest.mark.parametrize("name,what", [("oob_global", "heap-buffer-overflow"),
                                       ("oob_shared", "global-buffer-overflow")])
def test_out_of_bounds(emu, name, what):
    r = findings(emu.planted(name))
    assert "AddressSanitizer" in r and what in r and "failed" in r, r[:2000]


@pytest.mark.parametrize("name,what", [
    ("divergent_barrier", "is not reached by 32 of 64 threads"),
    ("split_barrier", "threads wait at different __syncthreads"),
    ("bad_mask", "__shfl_xor_sync with mask 0xffffffff"),
    ("misaligned", "misaligned read of float4"),
    ("wmma_misaligned", "misaligned wmma::load_matrix_sync pointer"),
    ("bad_config", "invalid launch configuration grid (1,70000,1)"),
])
def test_launch_findings(emu, name, what):
    r = findings(emu.planted(name))
    assert what in r, r


def output(emu, name) -> torch.Tensor:
    return torch.tensor(list(bytes.fromhex(result(emu.planted(name)))), dtype=torch.uint8)


@pytest.mark.parametrize("name", ["missing_sync", "atomic_order"])
def test_schedule_dependence_is_caught(emu, name):
    # a missing barrier (threads of a phase run in another order) and float atomics (applied in
    # another order) both change the result with the schedule: under_schedules reports it
    with pytest.raises(AssertionError, match="changes with the schedule"):
        under_schedules(emu, lambda: output(emu, name))
    under_schedules(emu, lambda: output(emu, "correct"))


def test_errors_of_emulated_ops_are_exceptions(emu):
    # A C++ exception from an emulated op (a failed check here; an emulated launch's finding is
    # raised the same way, by LORA_EXT_CUDA_CHECK with the finding's text) must reach the test as
    # a RuntimeError. With libasan preloaded alone it aborted the whole suite instead
    # ("CHECK failed: ... real___cxa_throw"): tests/test_emulation.py preloads libstdc++ too.
    with pytest.raises(RuntimeError, match="lora_apply_"):
        emu.ops.lora_apply_(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(2, 6),
                            torch.zeros(4, 2), 1.0)
