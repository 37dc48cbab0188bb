"""Supervised fine-tuning: response-only loss, layer selection (full and LoRA), determinism, resume,
the saved folder, bad input, and the CLI command."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from layerscope.cli.finetune import finetune_cmd
from layerscope.cli.layer_lists import parse_layer_list
from layerscope.data.corpus import encode
from layerscope.data.instructions import (
    InstructionExample,
    instruction_sequences,
    load_instructions,
)
from layerscope.data.sequences import ScoredSequence
from layerscope.errors import LayerscopeError
from layerscope.models import architecture, load_model, model_fingerprint
from layerscope.models.tiny import build_tiny_model
from layerscope.training import FinetuneConfig, finetune
from layerscope.training.checkpoints import CHECKPOINTS
from layerscope.training.job import split_examples


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread; on a busy 2-core machine, two threads spin and wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PAIRS = [
    ("Say hi.", "hi there"),
    ("What is 2+2?", "four"),
    ("Name a colour.", "blue"),
    ("Capital of France?", "Paris"),
    ("Opposite of up?", "down"),
]


def short_sequences(tokenizer, pairs=PAIRS) -> list[ScoredSequence]:
    """BOS + prompt + response + EOS, scored on the response and EOS (short, for speed)."""
    out = []
    for i, (prompt, response) in enumerate(pairs):
        p = [tokenizer.bos_token_id] + encode(tokenizer, prompt + "\n")
        r = encode(tokenizer, response) + [tokenizer.eos_token_id]
        out.append(ScoredSequence(tuple(p + r), tuple([False] * len(p) + [True] * len(r)), group=i))
    return out


def fresh(name: str):
    return build_tiny_model(name, seed=0)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def block_prefix(model, layer: int) -> str:
    block = architecture(model).block(layer)
    return next(n for n, m in model.named_modules() if m is block) + "."


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# ----------------------------------------------------------------------------------------------
# Loss


def reference_loss(model, sequences) -> float:
    """Token-weighted mean cross-entropy over target positions, one unpadded sequence at a time, float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq.input_ids])
            logits = model(input_ids=ids).logits[0].double()
            mask = torch.tensor(seq.target_mask)[1:]
            nll = F.cross_entropy(logits[:-1][mask], ids[0, 1:][mask], reduction="sum")
            total += float(nll)
            count += int(mask.sum())
    return total / count


@pytest.mark.parametrize("batch_size,grad_accum", [(5, 1), (2, 3)])
def test_first_step_loss_is_response_only_cross_entropy(tmp_path, batch_size, grad_accum):
    model, tok = fresh("tiny-llama")
    seqs = short_sequences(tok)
    expected = reference_loss(model, seqs)
    # a prompt-inclusive loss would be something else: make sure the test can tell them apart
    everything = [ScoredSequence(s.input_ids, (False,) + (True,) * (len(s) - 1)) for s in seqs]
    assert abs(reference_loss(model, everything) - expected) > 1e-3
    config = FinetuneConfig(max_steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3, save_every=0)
    result = finetune(model, tok, seqs, tmp_path / "out", config, progress=False)
    assert result.steps == 1
    assert result.losses[0] == pytest.approx(expected, abs=1e-5)


def test_loss_decreases(tmp_path):
    model, tok = fresh("tiny-llama")
    seqs = short_sequences(tok)[:3] * 2
    config = FinetuneConfig(max_steps=30, batch_size=6, lr=1e-2, lr_schedule="constant", train_embeddings=True, save_every=0)
    result = finetune(model, tok, seqs, tmp_path / "out", config, progress=False)
    assert result.steps == 30 and len(result.losses) == 30
    assert result.losses[-1] < 0.5 * result.losses[0], result.losses
    frame = result.to_frame()
    assert list(frame.columns) == ["step", "loss", "lr"]
    assert frame["step"].tolist() == list(range(1, 31))
    assert frame["lr"].tolist() == [1e-2] * 30


def test_linear_schedule_warms_up_and_decays(tmp_path):
    model, tok = fresh("tiny-llama")
    config = FinetuneConfig(max_steps=6, warmup_steps=2, batch_size=5, lr=1e-3, save_every=0)
    result = finetune(model, tok, short_sequences(tok), tmp_path / "out", config, progress=False)
    expected = [1e-3 / 3, 2e-3 / 3] + [1e-3 * (6 - s) / 4 for s in range(2, 6)]
    assert result.lrs == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# Which parameters change


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_only_chosen_layers_change(tmp_path, name, method):
    model, tok = fresh(name)
    before = params_of(model)
    config = FinetuneConfig(method=method, layers=[1, 2], max_steps=3, batch_size=5, lr=1e-2, save_every=0)
    result = finetune(model, tok, short_sequences(tok), tmp_path / "out", config, progress=False)
    assert result.trained_layers == [1, 2]
    after = params_of(model)
    assert set(after) == set(before)  # plain model again: no LoRA tensors left
    assert not any("lora" in n for n, _ in model.named_modules())
    assert not model.training
    moved = changed(before, after)
    inside = {k for k in before if k.startswith((block_prefix(model, 1), block_prefix(model, 2)))}
    assert moved and moved <= inside, sorted(moved - inside)
    arch = architecture(model)
    for layer in (1, 2):
        if method == "full":  # every matrix of the chosen blocks moved
            prefix = block_prefix(model, layer)
            matrices = {k for k in inside if k.startswith(prefix) and before[k].dim() == 2}
            assert matrices <= moved, sorted(matrices - moved)
        else:  # every adapted role matrix moved (after the merge), nothing else did
            for role in arch.roles():
                module = arch.role_module(role, layer)
                wname = next(n for n, m in model.named_modules() if m is module) + ".weight"
                assert wname in moved
    if method == "lora":
        assert all(k.endswith(".weight") and before[k].dim() == 2 for k in moved)
        assert (result.out_dir / "adapter" / "adapter_config.json").is_file()
        assert result.lora_targets and all(".1." in t or ".2." in t for t in result.lora_targets)
        # trainable count is the adapters': r * (in + out) per target
        assert result.trainable_parameters < result.total_parameters / 4
    assert result.total_parameters == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,method", [("tiny-llama", "full"), ("tiny-gpt2", "lora")])
def test_freeze_layers_stay_bit_identical(tmp_path, name, method):
    model, tok = fresh(name)
    before = params_of(model)
    config = FinetuneConfig(method=method, freeze_layers=[0, 3], max_steps=3, batch_size=5, lr=1e-2, save_every=0)
    result = finetune(model, tok, short_sequences(tok), tmp_path / "out", config, progress=False)
    assert result.trained_layers == [1, 2] and result.frozen_layers == [0, 3]
    moved = changed(before, params_of(model))
    frozen = (block_prefix(model, 0), block_prefix(model, 3))
    assert not {k for k in moved if k.startswith(frozen)}
    for layer in (1, 2):
        assert any(k.startswith(block_prefix(model, layer)) for k in moved)


def test_train_embeddings_with_tied_head(tmp_path):
    model, tok = fresh("tiny-gpt2")
    arch = architecture(model)
    assert arch.lm_head().weight is arch.embeddings()[0].weight  # tied in GPT-2
    before = params_of(model)
    config = FinetuneConfig(layers=[3], train_embeddings=True, max_steps=2, batch_size=5, lr=1e-2, save_every=0)
    finetune(model, tok, short_sequences(tok), tmp_path / "out", config, progress=False)
    moved = changed(before, params_of(model))
    assert "transformer.wte.weight" in moved and "transformer.ln_f.weight" in moved
    assert not {k for k in moved if k.startswith(block_prefix(model, 0))}
    assert arch.lm_head().weight is arch.embeddings()[0].weight  # still tied


# ----------------------------------------------------------------------------------------------
# Determinism and resume


def test_same_seed_same_weights(tmp_path):
    # GPT-2 has dropout 0.1: the seed has to control it too
    results = []
    for run, seed in enumerate([0, 0, 1]):
        model, tok = fresh("tiny-gpt2")
        config = FinetuneConfig(max_steps=4, batch_size=2, lr=1e-3, seed=seed, save_every=0)
        finetune(model, tok, short_sequences(tok), tmp_path / f"run{run}", config, progress=False)
        results.append(params_of(model))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert not all(torch.equal(results[0][k], results[2][k]) for k in results[0])


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("name,method", [("tiny-gpt2", "full"), ("tiny-llama", "lora")])
def test_resume_gives_the_uninterrupted_result(tmp_path, name, method):
    # 5 sequences in micro-batches of 2, two per step: 2 steps per epoch, so 6 steps cross epochs
    config = FinetuneConfig(
        method=method, layers=[1, 2], max_steps=6, batch_size=2, grad_accum=2, lr=1e-2, save_every=1,
        lora_dropout=0.1 if method == "lora" else 0.0,
    )
    model, tok = fresh(name)
    seqs = short_sequences(tok)
    straight = finetune(model, tok, seqs, tmp_path / "straight", config, progress=False)
    expected = params_of(model)

    model, tok = fresh(name)
    base = model_fingerprint(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def stop(step, loss):
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(model, tok, seqs, tmp_path / "resumed", config, progress=False, callback=stop)
    # the failed run put the model back as it was, and kept the latest two checkpoints
    assert model_fingerprint(model) == base
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not model.training
    kept = sorted(p.name for p in (tmp_path / "resumed" / CHECKPOINTS).iterdir())
    assert kept == ["step-4", "step-5"]

    resumed = finetune(model, tok, seqs, tmp_path / "resumed", config, progress=False)
    assert resumed.resumed_from == 5
    assert resumed.losses == straight.losses and resumed.lrs == straight.lrs
    got = params_of(model)
    assert all(torch.equal(got[k], expected[k]) for k in expected), sorted(
        k for k in expected if not torch.equal(got[k], expected[k])
    )
    assert not (tmp_path / "resumed" / CHECKPOINTS).exists()  # the final folder supersedes them


def test_resume_refuses_another_run(tmp_path):
    model, tok = fresh("tiny-llama")
    seqs = short_sequences(tok)
    config = FinetuneConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=1)

    def stop(step, loss):
        if step == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        finetune(model, tok, seqs, tmp_path / "out", config, progress=False, callback=stop)
    other = FinetuneConfig(max_steps=4, batch_size=2, lr=5e-3, save_every=1)
    with pytest.raises(LayerscopeError, match=r"lr: 0\.001 there, 0\.005 now.*delete the folder"):
        finetune(model, tok, seqs, tmp_path / "out", other, progress=False)
    with pytest.raises(LayerscopeError, match="training data fingerprint"):
        finetune(model, tok, seqs[:3], tmp_path / "out", config, progress=False)
    # save_every may change; the run completes
    done = finetune(model, tok, seqs, tmp_path / "out", FinetuneConfig(max_steps=4, batch_size=2, lr=1e-3, save_every=3),
                    progress=False)
    assert done.resumed_from == 2 and done.steps == 4
    # a finished folder is not overwritten
    with pytest.raises(LayerscopeError, match="already holds a finished fine-tune"):
        finetune(*fresh("tiny-llama"), seqs, tmp_path / "out", config, progress=False)


# ----------------------------------------------------------------------------------------------
# The saved folder


@pytest.mark.parametrize("name,method", [("tiny-llama", "lora"), ("tiny-gpt2", "full")])
def test_saved_folder_loads_with_the_same_logits(tmp_path, name, method):
    from transformers import AutoModelForCausalLM

    model, tok = fresh(name)
    base = model_fingerprint(model)
    config = FinetuneConfig(method=method, layers=[2, 3], max_steps=3, batch_size=5, lr=1e-2, save_every=0)
    eval_seqs = short_sequences(tok, PAIRS[:2])
    result = finetune(model, tok, short_sequences(tok), tmp_path / "out", config, progress=False, eval_sequences=eval_seqs)
    folder = result.out_dir
    ids = torch.tensor([short_sequences(tok)[0].input_ids])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        loaded, loaded_tok = load_model(folder)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
        assert torch.allclose(hf(input_ids=ids).logits, expected, atol=1e-6, rtol=0)
    assert loaded_tok("hi")["input_ids"] == tok("hi")["input_ids"]
    assert model_fingerprint(loaded) == model_fingerprint(model)
    assert model._layerscope_source == str(folder)
    record = json.loads((folder / "finetune.json").read_text())
    assert record["base_fingerprint"] == base
    assert record["trained_layers"] == [2, 3]
    assert record["losses"] == result.losses and record["steps"] == 3
    assert record["config"]["method"] == method and "peft" in record["versions"]
    assert not (folder / CHECKPOINTS).exists()
    assert math.isfinite(result.eval_loss_before) and result.eval_loss_after < result.eval_loss_before


# ----------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"layers": [99]}, r"layer 99 is out of range.*0\.\.3"),
        ({"freeze_layers": [-9]}, r"-9"),
        ({"layers": [1, 2], "freeze_layers": [2, 3]}, r"layers \[1, 2\] and freeze_layers \[2, 3\] overlap in \[2\]"),
        ({"freeze_layers": [0, 1, 2, 3]}, r"nothing to train"),
        ({"method": "qlora"}, r"'qlora'.*full, lora"),
        ({"method": "lora", "lora_roles": ("q", "qq")}, r"'qq'"),
        ({"method": "lora", "train_embeddings": True}, r"train_embeddings"),
        ({"batch_size": 0}, r"batch_size 0"),
        ({"lr": -1.0}, r"lr -1\.0"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(tmp_path, kwargs, pattern):
    model, tok = fresh("tiny-llama")
    base = model_fingerprint(model)
    with pytest.raises(LayerscopeError, match=pattern):
        finetune(model, tok, short_sequences(tok), tmp_path / "out", FinetuneConfig(**kwargs), progress=False)
    assert not (tmp_path / "out").exists()
    assert model_fingerprint(model) == base


def test_bad_sequences_and_folders(tmp_path):
    model, tok = fresh("tiny-llama")
    with pytest.raises(LayerscopeError, match="empty data set"):
        finetune(model, tok, [], tmp_path / "a", progress=False)
    unscored = [ScoredSequence((1, 5, 6), (False, False, False))]
    with pytest.raises(LayerscopeError, match="sequence 0 has no scored token"):
        finetune(model, tok, unscored, tmp_path / "b", progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(LayerscopeError, match=r"already holds files \(notes.txt\)"):
        finetune(model, tok, short_sequences(tok), tmp_path / "c", progress=False)


# ----------------------------------------------------------------------------------------------
# Job and CLI


def write_instructions(path, n: int = 12):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            rec = {"instruction": f"Repeat the number {i}.", "context": "" if i % 2 else f"n={i}", "response": str(i)}
            f.write(json.dumps(rec) + "\n")
    return path


def test_split_examples_keeps_the_training_set_and_holds_out_others(tmp_path):
    path = write_instructions(tmp_path / "inst.jsonl", 12)
    train, held = split_examples(str(path), 5, 4, seed=3)
    assert train == load_instructions(str(path), limit=5, seed=3)
    assert len(held) == 4 and not set(held) & set(train)
    with pytest.raises(LayerscopeError, match="no examples left for evaluation"):
        split_examples(str(path), 12, 2, seed=0)


def test_split_examples_never_draws_an_excluded_example(tmp_path):
    path = write_instructions(tmp_path / "inst.jsonl", 12)
    test_set = tmp_path / "test.jsonl"
    with open(test_set, "w", encoding="utf-8") as f:  # examples 0 and 3, with extra whitespace
        f.write(json.dumps({"instruction": " Repeat the number 0. ", "context": "n=0", "response": "x"}) + "\n")
        f.write(json.dumps({"instruction": "Repeat the number 3.", "context": "", "response": "y"}) + "\n")
        f.write(json.dumps({"instruction": "Repeat the number 5.", "context": "other", "response": "z"}) + "\n")
    train, held = split_examples(str(path), 6, 3, seed=1, exclude=[str(test_set)])
    names = {e.instruction for e in train + held}
    assert "Repeat the number 0." not in names and "Repeat the number 3." not in names
    assert "Repeat the number 5." in names  # same instruction, other input: not the same example
    assert len(train) == 6 and len(held) == 3 and not set(held) & set(train)
    everything, _ = split_examples(str(path), None, 0, seed=1, exclude=[str(test_set)])
    assert len(everything) == 12 - 2
    train_only, _ = split_examples(str(path), 4, 0, seed=1, exclude=[str(test_set)])
    assert len(train_only) == 4 and not {e.instruction for e in train_only} & {"Repeat the number 0.", "Repeat the number 3."}
    with pytest.raises(LayerscopeError, match="nothing left to train on"):
        split_examples(str(path), None, 0, seed=0, exclude=[str(path)])


def test_paper_test_examples_are_excluded_from_dolly(shared_data):
    train, _ = split_examples("dolly", None, 0, seed=0, exclude=["prune_16"])
    assert len(load_instructions("dolly")) - len(train) == 7  # the 7 Dolly examples that are also test examples


def test_parse_layer_list():
    assert parse_layer_list(None) is None and parse_layer_list(" ") is None
    assert parse_layer_list("3,4,5") == [3, 4, 5]
    assert parse_layer_list("3-7") == [3, 4, 5, 6, 7]
    assert parse_layer_list(" 0, 2 ,5-6,2") == [0, 2, 5, 6]
    assert parse_layer_list("-1") == [-1]
    for junk in ("a,b", "3-", "1.5", "3--1", "1,,2"):
        with pytest.raises(LayerscopeError, match="bad layer list"):
            parse_layer_list(junk)
    with pytest.raises(LayerscopeError, match="7-3"):
        parse_layer_list("7-3")


def test_cli_finetune(tmp_path):
    app = typer.Typer()
    app.command()(finetune_cmd)
    data = write_instructions(tmp_path / "inst.jsonl", 10)
    out = tmp_path / "ft"
    args = ["tiny-llama", "--data", str(data), "--out", str(out), "--samples", "4", "--eval-samples", "2",
            "--layers", "1-2", "--max-steps", "3", "--batch-size", "2", "--lr", "0.01", "--max-len", "256", "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "3 steps" in result.output and "layers [1, 2]" in result.output and "eval loss" in result.output
    record = json.loads((out / "finetune.json").read_text())
    assert record["trained_layers"] == [1, 2] and record["num_sequences"] == 4 and record["base_source"] == "tiny-llama"
    loaded, _ = load_model(out)
    assert architecture(loaded).num_layers == 4

    bad = CliRunner().invoke(app, ["tiny-llama", "--data", str(data), "--out", str(tmp_path / "x"), "--layers", "a,b"])
    assert isinstance(bad.exception, LayerscopeError) and "'a'" in str(bad.exception)


def test_instruction_sequences_train_end_to_end(tmp_path):
    model, tok = fresh("tiny-qwen2")  # q/k/v biases, grouped-query attention
    examples = [InstructionExample(p, "", r) for p, r in PAIRS[:3]]
    seqs = instruction_sequences(tok, examples, "alpaca", max_len=256)
    config = FinetuneConfig(method="lora", layers=[0], lora_roles=("q", "v"), max_steps=2, batch_size=3, save_every=0)
    result = finetune(model, tok, seqs, tmp_path / "out", config, progress=False)
    assert result.steps == 2 and len(result.lora_targets) == 2
    assert all(math.isfinite(x) for x in result.losses)


def test_layer_lists_from_a_prediction_file(tmp_path):
    from layerscope.cli.layer_lists import parse_layer_list

    path = tmp_path / "prediction.json"
    path.write_text(json.dumps({"predicted_layers": [12, 13, 14], "control_layers": [6, 7, 8], "top": 3}))
    assert parse_layer_list(str(path)) == [12, 13, 14]
    assert parse_layer_list(f"{path}:control_layers") == [6, 7, 8]
    with pytest.raises(LayerscopeError, match="no layer list 'top'; allowed: control_layers, predicted_layers"):
        parse_layer_list(f"{path}:top")
    with pytest.raises(LayerscopeError, match="does not exist"):
        parse_layer_list(str(tmp_path / "missing.json"))
