"""scripts/finetune.py and fastmax_hf.distill on CPU: tiny Llama, a slice of the stdlib corpus.

Runs go through the script's main() in this process (the accelerate state is shared
between runs, all with the same settings), except the two-process run, which goes
through `accelerate launch`.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

import fastmax_hf
from fastmax_hf import data, distill

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"


finetune = load_script(SCRIPT, "finetune_script")
script_common = sys.modules["script_common"]  # imported by the script from its own folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fastmax_cache")


@pytest.fixture(scope="module")
def tiny(cache_dir):
    """Arguments shared by every run: a tiny GQA Llama on 32-token blocks of 150 stdlib files."""
    return ["--model_name_or_path", "llama-tiny", "--vocab_size", "512", "--max_files", "150", "--block_size", "32",
            "--per_device_train_batch_size", "4", "--eval_blocks", "16", "--cache_dir", str(cache_dir),
            "--mixed_precision", "no"]


def run(argv, out):
    history = finetune.main([*argv, "--output_dir", str(out)])
    return history


def train_losses(history):
    return [r["train_loss"] for r in history if r.get("train_loss") is not None]


def read_log(out):
    with open(Path(out) / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, tiny):
    """A softmax (sdpa) model trained from scratch: what swap and distill convert."""
    out = tmp_path_factory.mktemp("teacher")
    history = run([*tiny, "--attention", "sdpa", "--max_train_steps", "40", "--eval_every", "20",
                   "--learning_rate", "3e-3"], out)
    return out, history


# --------------------------------------------------------------------------- the script, end to end


def test_scratch_fastmax_loss_falls_and_outputs_are_written(tmp_path, tiny):
    history = run([*tiny, "--max_train_steps", "40", "--eval_every", "20", "--learning_rate", "3e-3"], tmp_path)
    losses = train_losses(history)
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    evals = [r for r in history if r.get("val_loss") is not None]
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["final"]["val_loss"] == pytest.approx(evals[-1]["val_loss"])
    assert results["final"]["val_ppl"] == pytest.approx(torch.tensor(evals[-1]["val_loss"]).exp().item(), rel=1e-6)
    assert results["fastmax"]["p"] == 2
    for name in ("log.csv", "loss.png", "config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(read_log(tmp_path)) == 41  # the step-0 evaluation and one row per step


def test_teacher_trains_with_sdpa(teacher):
    out, history = teacher
    losses = train_losses(history)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert "fastmax" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("mode, extra", [("swap", []), ("distill", ["--lora_rank", "4", "--gradient_checkpointing"])])
def test_conversion_modes_run(tmp_path, tiny, teacher, mode, extra):
    teacher_dir, teacher_history = teacher
    model_args = [a if a != "llama-tiny" else str(teacher_dir) for a in tiny]
    history = run([*model_args, "--mode", mode, "--max_train_steps", "8", "--eval_every", "4", *extra], tmp_path)
    assert len(train_losses(history)) == 8
    assert all(torch.isfinite(torch.tensor(train_losses(history))))
    stages = [r["stage"] for r in history if r.get("train_loss") is not None]
    assert stages == (["transfer"] * 2 + ["train"] * 6 if mode == "distill" else ["train"] * 8)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastmax")
    assert not any("lora" in name for name, _ in reloaded.named_parameters())  # adapters were merged


def test_saved_model_reloads_with_its_fastmax_options(tmp_path, tiny):
    options = ["--fastmax_temperature", "1.5", "--fastmax_a2", "0.4"]
    history = run([*tiny, "--max_train_steps", "3", "--eval_every", "3", *options], tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastmax")
    assert model.config._attn_implementation == "fastmax"
    assert fastmax_hf.get_fastmax_config(model.config) == fastmax_hf.FastmaxConfig(temperature=1.5, a2=0.4)
    # the reloaded model scores the validation blocks exactly as the script's final evaluation did
    tokenizer = data.load_tokenizer(str(tmp_path))
    args = finetune.parse_args([*tiny])
    splits = data.load_text_dataset(max_files=150)
    blocks = data.token_blocks(splits, tokenizer, 32, args.cache_dir)["validation"][:16]
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b, labels=b).loss.item() for b in blocks.split(4)]
    assert sum(losses) / len(losses) == pytest.approx(history[-1]["val_loss"], rel=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny, teacher):
    """distill across its stage boundary: interrupted in stage 1 (step 3) and in stage 2 (step 6)."""
    teacher_dir, _ = teacher
    model_args = [a if a != "llama-tiny" else str(teacher_dir) for a in tiny]
    argv = [*model_args, "--mode", "distill", "--max_train_steps", "9", "--distill_steps", "4", "--lora_rank", "4",
            "--eval_every", "3", "--checkpointing_steps", "3"]
    straight = run(argv, tmp_path / "straight")

    resumed_dir = tmp_path / "resumed"
    run([*argv, "--stop_at_step", "3"], resumed_dir)
    assert not (resumed_dir / "results.json").exists()
    run([*argv, "--resume_from_checkpoint", "latest", "--stop_at_step", "6"], resumed_dir)
    resumed = run([*argv, "--resume_from_checkpoint", str(resumed_dir / "checkpoints" / "step_000006")], resumed_dir)

    def curve(history):
        return [(r["step"], r["stage"], r.get("train_loss"), r.get("val_loss")) for r in history]

    assert curve(resumed) == curve(straight)  # exactly: same data, weights, optimizer state
    assert [r["train_loss"] for r in read_log(resumed_dir)] == [r["train_loss"] for r in read_log(tmp_path / "straight")]
    with pytest.raises(SystemExit, match="different run.*seed"):
        run([*argv, "--seed", "1", "--resume_from_checkpoint", "latest"], resumed_dir)
    with pytest.raises(SystemExit, match="different run.*max_steps.*only grow"):
        run([*argv, "--max_train_steps", "8", "--resume_from_checkpoint", "latest"], resumed_dir)  # the last flag wins

    # the finished run extended to 12 steps: its default --distill_steps (12 // 4 = 3) would move the
    # stage boundary, so the checkpoint's 4 is kept; steps 10-12 follow the 12-step schedule
    at = argv.index("--distill_steps")
    longer = [*argv[:at], *argv[at + 2:], "--max_train_steps", "12"]
    extended = run([*longer, "--resume_from_checkpoint", "latest"], resumed_dir)
    assert curve(extended)[:len(straight)] == curve(straight)
    assert [(r["step"], r["stage"]) for r in extended[len(straight):]] == [(10, "train"), (11, "train"), (12, "train")]
    args = finetune.parse_args(longer)
    stage = finetune.Stage("train", 1, 4, 12, args.lr)
    assert [r["lr"] for r in extended[len(straight):]] == [finetune.learning_rate(s, stage, args) for s in (9, 10, 11)]
    assert extended[-1]["val_loss"] is not None
    results = json.loads((resumed_dir / "results.json").read_text())
    assert results["steps"] == 12 and results["stages"][0]["end"] == 4
    assert script_common.checkpoint_problem(resumed_dir / "checkpoints" / "step_000012") is None


def test_a_finished_run_extended_from_its_last_checkpoint_equals_the_longer_run(tmp_path, tiny):
    """With a constant learning rate the schedule does not depend on --max_train_steps, so a 4-step
    run extended to 6 steps must be the 6-step run exactly (same data order, weights, optimizer)."""
    argv = [*tiny, "--num_warmup_steps", "0", "--min_lr_ratio", "1", "--eval_every", "2", "--checkpointing_steps", "0"]
    straight = run([*argv, "--max_train_steps", "6"], tmp_path / "straight")
    out = tmp_path / "extended"
    run([*argv, "--max_train_steps", "4"], out)
    assert json.loads((out / "results.json").read_text())["steps"] == 4  # finished
    extended = run([*argv, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"], out)
    assert _curve(extended) == _curve(straight)
    assert [r["step"] for r in read_log(out)][-1] == "6"
    assert json.loads((out / "results.json").read_text())["steps"] == 6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000006"]


# --------------------------------------------------------------------------- the command line

# run_clm_no_trainer.py's names and the names they replaced (still accepted), with a value for each
RENAMED = [("--model_name_or_path", "--model", "llama-tiny"), ("--dataset_name", "--dataset", "corpus.txt"),
           ("--dataset_config_name", "--dataset_config", "wikitext-2-raw-v1"),
           ("--tokenizer_name", "--tokenizer", "default"), ("--validation_split_percentage", "--validation_percent", "3"),
           ("--per_device_train_batch_size", "--batch_size", "3"), ("--learning_rate", "--lr", "0.002"),
           ("--gradient_accumulation_steps", "--grad_accum", "2"), ("--max_train_steps", "--max_steps", "7"),
           ("--num_warmup_steps", "--warmup_steps", "2"), ("--checkpointing_steps", "--save_every", "5"),
           ("--block_size", "--seq_len", "64")]


@pytest.mark.parametrize("new, old, value", RENAMED)
def test_new_names_and_old_aliases_give_the_same_arguments(new, old, value):
    by_new, by_old = finetune.parse_args([new, value]), finetune.parse_args([old, value])
    assert vars(by_new) == vars(by_old)
    assert vars(by_new) != vars(finetune.parse_args([]))  # the value was taken


def test_every_option_has_help_that_shows_its_default():
    parser = finetune.build_parser()
    help_text = {action.dest: parser.formatter_class("finetune.py")._get_help_string(action) % vars(action)
                 for action in parser._actions if action.dest != "help"}
    undocumented = [dest for dest, text in help_text.items() if "default" not in text.lower()]
    assert not undocumented
    for name in ("--model_name_or_path", "--dataset_name", "--dataset_config_name", "--train_file",
                 "--per_device_train_batch_size", "--learning_rate", "--gradient_accumulation_steps",
                 "--max_train_steps", "--num_warmup_steps", "--checkpointing_steps", "--resume_from_checkpoint",
                 "--with_tracking", "--report_to", "--block_size", "--output_dir", "--seed"):
        assert name in parser._option_string_actions, name
    assert "(default: 200)" in parser.format_help()  # --max_train_steps


def test_old_names_still_run_the_script(tmp_path, cache_dir):
    old = ["--model", "llama-tiny", "--vocab_size", "512", "--max_files", "150", "--seq_len", "32", "--batch_size", "4",
           "--grad_accum", "2", "--max_steps", "2", "--lr", "3e-3", "--warmup_steps", "1", "--save_every", "1",
           "--eval_blocks", "8", "--cache_dir", str(cache_dir), "--mixed_precision", "no", "--report_to", "none"]
    history = run(old, tmp_path)
    assert [r["step"] for r in history] == [0, 1, 2] and history[1]["lr"] == 3e-3
    assert history[-1]["tokens"] == 2 * 4 * 2 * 32
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001", "step_000002"]
    assert not (tmp_path / "tensorboard").exists()  # --report_to none


def test_with_tracking_fails_where_the_tracker_is_not_installed(tmp_path, tiny, monkeypatch):
    monkeypatch.setattr(finetune, "_installed", lambda package: package != "wandb")
    with pytest.raises(SystemExit, match="--with_tracking --report_to wandb: the `wandb` package is not installed"):
        run([*tiny, "--with_tracking", "--report_to", "wandb"], tmp_path)
    args = finetune.parse_args(["--report_to", "wandb"])
    assert finetune.choose_tracker(args) is None  # without --with_tracking: skipped
    assert finetune.choose_tracker(finetune.parse_args(["--with_tracking"])) == "tensorboard"


def test_train_file_is_read_with_datasets(tmp_path, tiny):
    pytest.importorskip("datasets")
    lines = [{"text": f"def f{i}(x):\n    return x + {i}\n" * 20} for i in range(40)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(line) + "\n" for line in lines))
    history = run([*tiny, "--train_file", str(corpus), "--max_train_steps", "2", "--eval_blocks", "2"], tmp_path / "out")
    assert len(train_losses(history)) == 2
    assert json.loads((tmp_path / "out" / "results.json").read_text())["train_file"] == str(corpus)
    args = finetune.parse_args([*tiny, "--train_file", str(corpus)])
    splits = data.load_datasets_source(str(corpus), validation_percent=args.validation_percent, local=True)
    assert len(splits.train) + len(splits.validation) == 40


def test_a_missing_datasets_package_is_named_with_the_argument(tmp_path, tiny, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("x = 1\n" * 100)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    with pytest.raises(SystemExit, match="--train_file '.*corpus.txt' is read with the `datasets` package, which is not installed"):
        run([*tiny, "--train_file", str(corpus), "--max_train_steps", "2"], tmp_path / "out")
    with pytest.raises(SystemExit, match="--dataset_name '.*corpus.txt' is read with the `datasets` package"):
        run([*tiny, "--dataset_name", str(corpus), "--max_train_steps", "2"], tmp_path / "out")


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _curve(history):
    return [(r["step"], r["stage"], r.get("train_loss"), r.get("val_loss")) for r in history]


def test_damaged_checkpoints_are_named_and_latest_takes_the_newest_complete_one(tmp_path, tiny, capsys):
    """A truncated trainer_state.json or .safetensors: named explicitly, an error naming the
    file; with 'latest', skipped for the newest complete checkpoint (and the run still
    reproduces the uninterrupted one)."""
    argv = [*tiny, "--max_train_steps", "6", "--checkpointing_steps", "2", "--eval_every", "3"]
    out = tmp_path / "run"
    straight = run(argv, out)
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000004", "step_000006"]

    _truncate(checkpoints / "step_000006" / "trainer_state.json")
    with pytest.raises(SystemExit, match=r"step_000006/trainer_state\.json is damaged: not valid JSON"):
        run([*argv, "--resume_from_checkpoint", str(checkpoints / "step_000006")], out)
    _truncate(checkpoints / "step_000004" / "model.safetensors")
    with pytest.raises(SystemExit, match=r"step_000004/model\.safetensors is damaged: truncated"):
        run([*argv, "--resume_from_checkpoint", str(checkpoints / "step_000004")], out)
    _truncate(checkpoints / "step_000002" / "optimizer.bin")
    with pytest.raises(SystemExit, match=r"step_000002/optimizer\.bin is damaged"):
        run([*argv, "--resume_from_checkpoint", str(checkpoints / "step_000002")], out)
    with pytest.raises(SystemExit, match="no complete checkpoint.*step_000006.*step_000004.*step_000002"):
        run([*argv, "--resume_from_checkpoint", "latest"], out)

    # step 2 repaired (as a fresh run writes it): 'latest' skips 6 and 4, resumes at 2, and the
    # checkpoints it writes again replace the damaged ones
    shutil.rmtree(checkpoints)
    run([*argv, "--stop_at_step", "2"], out)
    (checkpoints / "step_000004").mkdir()
    (checkpoints / "step_000004" / "trainer_state.json").write_text('{"step": 4, "sta')
    capsys.readouterr()
    resumed = run([*argv, "--resume_from_checkpoint", "latest"], out)
    assert "skipping step_000004" in capsys.readouterr().err
    assert _curve(resumed) == _curve(straight)
    for name in ("step_000004", "step_000006"):
        assert script_common.checkpoint_problem(checkpoints / name) is None


class Killed(Exception):
    """Stands for the process being killed in the middle of writing a checkpoint."""


def test_a_kill_while_saving_leaves_the_previous_checkpoint_usable(tmp_path, tiny, monkeypatch):
    argv = [*tiny, "--max_train_steps", "6", "--checkpointing_steps", "2", "--eval_every", "3"]
    straight = run(argv, tmp_path / "straight")
    original = finetune.Accelerator.save_state

    def killed_at_step_4(self, output_dir=None, **kwargs):
        result = original(self, output_dir, **kwargs)
        if output_dir.endswith("step_000004"):
            _truncate(Path(output_dir) / "model.safetensors")  # half written when the kill came
            raise Killed
        return result

    monkeypatch.setattr(finetune.Accelerator, "save_state", killed_at_step_4)
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(argv, out)
    monkeypatch.undo()
    checkpoints = out / "checkpoints"
    # nothing partial under a checkpoint's name: step 4 never appeared, step 2 is whole
    assert sorted(p.name for p in checkpoints.iterdir()) == ["incomplete-step_000004", "step_000002"]
    assert script_common.checkpoint_problem(checkpoints / "step_000002") is None
    resumed = run([*argv, "--resume_from_checkpoint", "latest"], out)
    assert _curve(resumed) == _curve(straight)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000002", "step_000004", "step_000006"]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--model_name_or_path", "/no/such/model"], "--model_name_or_path '/no/such/model'"),
        (["--dataset_name", "/no/such/corpus.jsonl"], "--dataset_name: no such file"),
        (["--train_file", "/no/such/corpus.jsonl"], "--train_file: no such file"),
        (["--train_file", "a.txt", "--dataset_name", "b.txt"], "--train_file and --dataset_name both name"),
        (["--block_size", "8192"], "--block_size 8192 exceeds the model's 4096 positions"),
        (["--mode", "swap", "--attention", "sdpa"], "only applies to --mode scratch"),
        (["--mode", "distill", "--distill_steps", "5", "--max_train_steps", "5"], "--distill_steps"),
        (["--mode", "swap", "--kd_weight", "0.5"], "needs a pretrained softmax --model_name_or_path"),
        (["--with_tracking", "--report_to", "none"], "--with_tracking needs a --report_to tracker"),
        (["--dataset_name", "pydoc-topics"], "--dataset_name pydoc-topics is held out for evaluation"),
        (["--dataset_name", "heldout-stdlib"], "--dataset_name heldout-stdlib is held out for evaluation"),
    ],
)
def test_bad_input_fails_before_training(tmp_path, tiny, change, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(")):
        run([*tiny, "--max_train_steps", "2", *change], tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_a_model_family_fastmax_cannot_patch_is_refused(tmp_path, tiny):
    from transformers import OPTConfig

    model_dir = tmp_path / "opt"
    OPTConfig(vocab_size=512, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2).save_pretrained(model_dir)
    with pytest.raises(SystemExit, match="model type 'opt'"):
        run([*tiny, "--model_name_or_path", str(model_dir), "--tokenizer_name", "default", "--max_train_steps", "2"],
            tmp_path / "out")


def test_two_processes_under_accelerate_launch(tmp_path, tiny):
    # `accelerate launch --cpu` starts one process (several need mpirun); --multi_gpu with
    # ACCELERATE_USE_CPU=1 starts torchrun workers that join a gloo group on the CPU.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    bf16 = [a if a != "no" else "bf16" for a in tiny]  # --mixed_precision bf16: autocast on the CPU
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no", str(SCRIPT),
           *bf16, "--max_train_steps", "4", "--eval_every", "2", "--output_dir", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and "precision bf16" in done.stdout
    rows = read_log(tmp_path)
    assert int(rows[-1]["tokens"]) == 4 * 4 * 2 * 32  # steps * batch * processes * seq_len
    assert json.loads((tmp_path / "results.json").read_text())["final"]["val_loss"] > 0
    AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastmax")


# --------------------------------------------------------------------------- fastmax_hf.distill


def _tiny_llama(seed=0, sharpen=1.0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(data.builtin_model_config("llama-tiny", vocab_size=128),
                                             attn_implementation="sdpa").eval()
    with torch.no_grad():  # larger q/k weights make softmax attention peaked, unlike fastmax's
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    return model


def _perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))


def _tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merged_lora_and_folded_gains_compute_what_the_student_computed(family):
    model = _tiny_llama() if family == "llama" else _tiny_gpt2()
    ids = torch.randint(0, 128, (2, 24))
    model, params = distill.start_attention_transfer(model, lora_rank=4)
    _perturb(params)  # LoRA's B starts at 0: perturbing makes the merge non-trivial
    with distill.attention_implementation(model, distill.GAINED_ATTENTION), torch.no_grad():
        student = model(ids).logits
    model = distill.finish_attention_transfer(model)
    assert model.config._attn_implementation == "fastmax"
    assert not any(distill.GAIN_ATTRIBUTE in name or "lora" in name for name, _ in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        converted = model(ids).logits
    torch.testing.assert_close(converted, student, rtol=1e-4, atol=1e-5)


def test_distill_attention_is_teacher_forced():
    model = _tiny_llama(sharpen=4.0)
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        softmax = model(ids).logits
    model, params = distill.start_attention_transfer(model, lora_rank=4)
    _perturb(params)
    distill.record_teacher(model, ids)  # the original model: adapters off
    torch.testing.assert_close(model(ids).logits, softmax)  # every layer passes the teacher's output on
    loss = distill.attention_transfer_loss(model)
    loss.backward()
    layers = model.config.num_hidden_layers
    assert len(params) == 2 * layers + 4 * layers  # gains (real, imag) and LoRA (A, B) on q_proj and k_proj
    assert {p for p in model.parameters() if p.requires_grad} == set(params)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    with pytest.raises(RuntimeError, match="no attention transfer loss"):
        distill.attention_transfer_loss(model)  # the records were consumed
    with pytest.raises(RuntimeError, match="record_teacher"):
        model(ids)  # and so were the teacher outputs


@pytest.mark.parametrize("lora_rank, ratio", [(0, 0.95), (8, 0.4)])
def test_attention_transfer_reduces_the_output_mse(lora_rank, ratio):
    model, params = distill.start_attention_transfer(_tiny_llama(sharpen=8.0), lora_rank=lora_rank)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    mse = []
    for _ in range(40):
        distill.record_teacher(model, ids)
        model(ids)
        loss = distill.attention_transfer_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mse.append(loss.item())
    assert mse[-1] < ratio * mse[0]


def test_logit_kl_is_the_kl_divergence_per_token():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    p = teacher.softmax(-1)
    expected = (p * (p.log() - student.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(distill.logit_kl(student, teacher), expected)
    assert distill.logit_kl(teacher, teacher).abs() < 1e-6


def test_padding_is_refused_during_attention_transfer():
    model, _ = distill.start_attention_transfer(_tiny_llama())
    ids = torch.randint(0, 128, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="packed, unpadded"):
        model(ids, attention_mask=mask)


def test_qwen3_q_norm_is_refused_for_distill():
    from transformers import Qwen3Config

    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="q_norm"):
        distill.start_attention_transfer(model)


def test_the_readme_s_finetune_commands_parse():
    """Every `python scripts/finetune.py ...` line of the README's shell blocks names options the
    script has (continuation lines joined, comments and a '...' placeholder dropped)."""
    import re
    import shlex

    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()
                if "python scripts/finetune.py" in line]
    assert len(commands) >= 3
    for command in commands:
        words = shlex.split(command.split("&&")[-1], comments=True)
        argv = [w for w in words[words.index("scripts/finetune.py") + 1:] if w != "..."]
        finetune.parse_args(argv)
    assert any("--max_train_steps" in c and "--resume_from_checkpoint" in c for c in commands)


# --------------------------------------------------------------------------- learned window gains


def test_learned_window_gains_train_resume_and_reload(tmp_path, tiny):
    # distill of the tiny built-in model with --window and --learn_window_gain: the gains move, land in
    # config.json per layer and head, a stopped and resumed run ends with the same gains, and the
    # saved model reloads as fastmax computing with them
    argv = [*tiny, "--mode", "distill", "--kd_weight", "0", "--max_train_steps", "6", "--distill_steps", "2",
            "--window", "8", "--learn_window_gain", "--window_gain_lr", "0.05", "--checkpointing_steps", "2"]
    straight = run(argv, tmp_path / "straight")
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    gains = config["fastmax"]["window_gain"]
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    assert len(gains) == layers and all(len(g) == heads for g in gains)
    assert all(abs(g - 1.0) > 1e-4 for g in sum(gains, []))  # every gain learned something
    assert json.loads((tmp_path / "straight" / "results.json").read_text())["fastmax"]["window_gain"] == gains
    stopped = tmp_path / "stopped"
    run([*argv, "--stop_at_step", "4"], stopped)
    resumed = run([*argv, "--resume_from_checkpoint", "latest"], stopped)
    assert _curve(resumed) == _curve(straight)
    again = json.loads((stopped / "config.json").read_text())["fastmax"]["window_gain"]
    assert sum(again, []) == pytest.approx(sum(gains, []), rel=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    assert model.config._attn_implementation == "fastmax"
    assert not any("window_gain" in name for name, _ in model.named_parameters())
    assert fastmax_hf.get_fastmax_config(model.config).window_gain[0] == tuple(gains[0])


def test_learn_window_gain_needs_a_window(tmp_path, tiny):
    with pytest.raises(SystemExit, match="--learn_window_gain needs --window"):
        run([*tiny, "--max_train_steps", "2", "--learn_window_gain"], tmp_path)
