"""The front door: `lmembed compress MODEL --bits B`, its report, its steps, its early refusals."""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors import safe_open

import lmembed
from lmembed.cli import main
from lmembed.common.steps import Steps, bars_wanted, human_bytes
from lmembed.compression.choose import choose
from lmembed.compression.formats.superblock import bits_per_value
from lmembed.errors import LmembedError
from tiny_models import D, V, build, save_folder

WORDS = "the cat a dog bird sees likes finds ball tree house river .".split()


def _text(tmp_path):
    from conftest import _sentences

    p = tmp_path / "text.txt"
    p.write_text("\n".join(_sentences(200, 3)) + "\n")
    return p


# --- which method for which budget -----------------------------------------------------------------
@pytest.mark.parametrize("bits", [2.5, 3, 3.5, 4, 4.5, 5, 6, 8])
def test_calibration_free_choice_is_the_widest_code_within_the_budget(bits):
    c = choose(bits, num_embeddings=49152, dim=576, has_head=True, calibrate=False)
    width, group = int(c.method[2]), int(c.method.split(":g")[1])
    assert bits_per_value(576, width, group) <= bits
    # no wider code fits at any group the chooser considers, and no smaller group at this width
    assert all(bits_per_value(576, width + 1, g) > bits for g in (16, 32, 64, 128, 256)) or width == 8
    assert group == 16 or bits_per_value(576, width, group // 2) > bits


def test_calibrated_choice_follows_the_model_and_the_budget():
    assert choose(4.5, num_embeddings=49152, dim=576, has_head=True).method == "tc:4.5"
    assert choose(3, num_embeddings=30522, dim=384, has_head=False).method == "kmixed:3"
    assert choose(12, num_embeddings=30522, dim=384, has_head=True).method == "int8"
    with pytest.raises(LmembedError, match="--bits 0.5"):  # below what tc's decoder and maps take
        choose(0.5, num_embeddings=V, dim=D, has_head=True)
    with pytest.raises(LmembedError, match="drop --no-calib"):
        choose(1.5, num_embeddings=49152, dim=576, has_head=True, calibrate=False)
    for bad in (0, -1, 16, float("nan"), True):
        with pytest.raises(LmembedError, match="bits"):
            choose(bad, num_embeddings=V, dim=D, has_head=True)


def test_python_compress_with_bits_picks_and_reports_the_method():
    model = build("gpt2")
    rep = lmembed.compress(model, bits=4.5, calib=False)
    assert rep["chosen"]["method"] == rep["method"] == "kq3:g32"  # d = 32: the fp16 super-pair costs 1 bit per value
    assert rep["stored_bytes"] * 8 <= 4.5 * V * D
    with pytest.raises(LmembedError, match="not both"):
        lmembed.compress(build("gpt2"), "int8", bits=4)


# --- pipelines are checked before anything loads ---------------------------------------------------
@pytest.mark.parametrize("pipeline,match", [
    ("tc:4.5 > int8", "stage 2 .'int8'.: takes a plain matrix or a factorisation, but stage 1 .'tc:4.5'. gives a "
                      "finished format"),
    ("int4 > int8", "gives fine-tunable codes"),
    ("kq4 > kl:10", "takes a factorisation or fine-tunable codes"),
    ("kl:10", "put it after another stage"),
])
def test_incompatible_pipelines_fail_before_the_model_loads(tmp_path, capsys, pipeline, match):
    assert main(["compress", str(tmp_path / "no-such-model"), "--method", pipeline, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmembed: error:")
    import re

    assert re.search(match, err), err


def test_compatible_pipelines_pass_the_static_check():
    from lmembed.compression.registry import parse_pipeline

    for ok in ("svd:8 > int8 > kl:2", "wsvd:8 > int4", "mixed:4 > kl:2", "wsvd:8:alloc=rows > kl:2",
               "trim:lee > svd:8 > kq4", "groupreduce:8:2 > int8"):
        parse_pipeline(ok)


# --- the command ---------------------------------------------------------------------------------
def test_bits_command_reports_sizes_quality_and_steps(tmp_path, capsys):
    folder = save_folder("llama-tied", tmp_path / "m", WORDS)
    out = tmp_path / "out"
    argv = ["compress", str(folder), "--bits", "5", "--no-calib", "--out", str(out), "--eval-text",
            str(_text(tmp_path)), "--no-progress", "--dtype", "bfloat16"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    rep = json.loads((out / "report.json").read_text())
    assert rep["chosen"] == {"bits": 5.0, "method": rep["method"], "why": rep["chosen"]["why"]}
    assert rep["method"].startswith("kq") and rep["stored_bytes"] * 8 <= 5 * V * D
    w = rep["whole_model"]
    assert w["body_dtype"] == "bfloat16" and w["source_files"] == ["model.safetensors"]
    assert w["source_bytes"] == (folder / "model.safetensors").stat().st_size
    assert w["tensor_bytes"] < w["source_bytes"]  # bf16 rest + 5-bit embedding < fp32 source
    assert rep["eval"]["metric"] == "ppl" and rep["eval"]["lower_is_better"]
    # stdout: the table (sizes and quality); stderr: one line per step, each with its time
    assert "| whole model |" in cap.out and "| perplexity," in cap.out and "smaller" in cap.out
    for step in ("load:", "method: kq", "evaluate dense:", "fit:", "evaluate compressed:", "save:"):
        assert step in cap.err, step
    assert "calibrate" not in cap.err  # a calibration-free method runs no calibration
    # the rest of the model is stored in bf16, the compressed codes as they were
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if "layers" in k} == {"BF16"}
    assert {d for k, d in dtypes.items() if k.endswith(".codes")} == {"U8"}
    loaded = lmembed.load(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.tensor([[3, 4, 5, 6]])
    assert loaded(ids).logits.dtype == torch.bfloat16


def test_quiet_prints_only_the_table_and_no_eval_skips_the_check(tmp_path, capsys):
    folder = save_folder("gpt2", tmp_path / "m", WORDS)
    argv = ["compress", str(folder), "--bits", "9", "--out", str(tmp_path / "o"), "--quiet", "--no-eval"]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert cap.err == "" and "| token embedding |" in cap.out and "perplexity" not in cap.out
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["method"] == "int8" and "eval" not in rep


def test_bits_and_method_together_are_refused(tmp_path, capsys):
    assert main(["compress", "x", "--bits", "4", "--method", "int8", "--out", str(tmp_path / "o")]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["compress", "x", "--bits", "40", "--out", str(tmp_path / "o")]) == 2
    assert "between 0 and 16" in capsys.readouterr().err


def test_help_shows_the_recommendation_and_examples(capsys):
    assert main(["compress", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--bits B chooses" in out and "examples:" in out and ".gguf" in out and "tc:AVG" in out


# --- visible steps -------------------------------------------------------------------------------
def test_bars_show_on_a_terminal_only_unless_asked():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert bars_wanted(None, stream=Tty()) and not bars_wanted(None, stream=io.StringIO())
    assert not bars_wanted(None, quiet=True, stream=Tty()) and bars_wanted(True, stream=io.StringIO())
    out = io.StringIO()
    steps = Steps(stream=out)
    with steps.step("calibrate") as s:
        s.note, s.cached = "4,096 tokens of model", True
    with steps.step("fit") as s:
        s.note = "tc:4.5"
    assert out.getvalue().splitlines() == ["calibrate: 4,096 tokens of model (cached)", "fit: tc:4.5 (0.0 s)"]
    assert [human_bytes(n) for n in (812, 15_925_246, 1_234_567_890)] == ["812 B", "15.9 MB", "1.23 GB"]


# --- bundled names -------------------------------------------------------------------------------
def test_bundled_names_in_any_case_and_near_misses_refused_before_any_hub_lookup(tmp_path, capsys, monkeypatch):
    from lmembed.models import pretrained

    assert pretrained.bundled_name("SmolLM2") == "smollm2" and pretrained.bundled_name(" MiniLM ") == "minilm"
    assert pretrained.bundled_name("gpt2") is None
    monkeypatch.setattr(pretrained, "_dequantised_copy", lambda *a: pytest.fail("no conversion for a typo"))
    for typo, near in (("smolm2", "smollm2"), ("MiniLMM", "minilm")):
        assert main(["compress", typo, "--bits", "4", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"did you mean {near!r}" in err
    assert pretrained.resolve_model("org/some-model") == ("org/some-model", None)  # a hub id stays one


def test_info_lists_the_bundled_models(capsys):
    from lmembed.cli import main
    from lmembed.models.pretrained import BUNDLED_MODELS

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "bundled models" in out
    for name, m in BUNDLED_MODELS.items():
        assert f"  {name} " in out and m.description in out


def test_library_bars_follow_lmembeds_rule(capsys):
    """transformers' GGUF conversion uses a bare tqdm bar: off in a pipe or a log, on when asked."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from lmembed.common.steps import library_bars

    original = gguf_utils.tqdm
    with library_bars(False):
        list(gguf_utils.tqdm(range(3), desc="CONVERTING"))
    assert "CONVERTING" not in capsys.readouterr().err and gguf_utils.tqdm is original
    with library_bars(True):
        list(gguf_utils.tqdm(range(3), desc="CONVERTING"))
    assert "CONVERTING" in capsys.readouterr().err


def test_eval_of_a_compressed_save_says_what_to_use_instead(tmp_path, capsys):
    import lmembed
    from lmembed.cli import main
    from tiny_models import build

    model = build("gpt2")
    lmembed.compress(model, "int8")
    lmembed.save(model, tmp_path / "save")
    assert main(["eval", str(tmp_path / "save")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run of `lmembed train`" in err[0] and "open_model" in err[0]
    assert lmembed.open_model(str(tmp_path / "save")).model is not None
