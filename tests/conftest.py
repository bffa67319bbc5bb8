import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test`: one worker per core) each worker and every kvbench subprocess it starts gets
# one intra-op thread, so N workers keep N cores busy instead of 2N threads spin-waiting for each other. Set
# before torch is imported, so the subprocesses (which inherit the environment) read it at their start too.
UNDER_XDIST = bool(os.environ.get("PYTEST_XDIST_WORKER"))
if UNDER_XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1 if UNDER_XDIST else min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_llama():
    from harness.models import build_tiny

    return build_tiny("llama")


def layer_inputs(queries, keys, values=None, layer_idx=0, seed=0):
    """LayerInputs for a scorer from hand-made tensors (module stands in with the default scaling)."""
    from harness.compress import LayerInputs

    class _Module(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.scaling = d ** -0.5

    values = keys.clone() if values is None else values
    return LayerInputs(layer_idx=layer_idx, n_layers=1, queries=queries, keys=keys, values=values,
                       module=_Module(keys.shape[-1]), generator=torch.Generator().manual_seed(seed))


def refused_in_process(capsys, *args) -> str:
    """``kvbench args``'s one refusal line, run in this process (the preflight refuses before Hydra starts, so no
    subprocess is needed): exit status 2 and one ``kvbench: error: ...`` line."""
    import sys

    from harness import cli

    argv = list(sys.argv)
    with pytest.raises(SystemExit) as exit_info:
        try:
            cli.main([*args])
        finally:
            sys.argv = argv
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvbench: error: "), lines
    return lines[0]
