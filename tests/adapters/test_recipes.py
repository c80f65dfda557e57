"""The swap pages' several-GPU recipes, run as written under ``torchrun``.

Each page's "Several GPUs" diff is read from the page: its runs of ``+`` lines go, in order,
into the ``#<slot>`` lines of a stand-in of the fork's script (the fork after the page's one-GPU
diff, in the fork's own order and indentation; its ``utils`` are ``_standin``). Two CPU gloo ranks
must save what one rank saves (1e-10, float64), only rank 0 may write, and ranks seeded
differently must stop with `RankMismatchError` instead of drifting apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _standin, as the scripts import it

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

PRELUDE = """\
import copy
import os
import random
import sys

import numpy as np
import torch

sys.path.insert(0, {here!r})
import _standin
from _standin import evaluate, get_images, get_network, load_buffer
from sharp_bilevel import SharpBilevelOptimizer
from sharp_bilevel.adapters import {fork}
"""

# The MTT fork after the one-GPU diff (distill.py's order and indentation).
MTT = """\
#<slot>


def main(args):
#<slot>
    eval_it_pool = list(range(0, args.Iteration + 1, args.eval_it))
    label_syn = torch.arange(args.classes).repeat_interleave(args.ipc)
    image_syn = torch.randn(args.classes * args.ipc, 1, 6, 6, dtype=torch.float64)
    syn_lr = torch.tensor(args.lr_teacher, dtype=torch.float64)
    for c in range(args.classes):
        image_syn.data[c * args.ipc : (c + 1) * args.ipc] = get_images(c, args.ipc)
    image_syn = image_syn.detach().requires_grad_(True)
    syn_lr = syn_lr.detach().requires_grad_(True)
#<slot>
#<slot>
    expert_files = ["a", "b"]
    random.shuffle(expert_files)
    buffer = load_buffer(expert_files[0])
    random.shuffle(buffer)
    expert_idx = 0
    for it in range(0, args.Iteration + 1):
        save_this_it = False
#<slot>
        if it in eval_it_pool:
            for model_eval in ["ConvNet"]:
                for it_eval in range(args.num_eval):
                    net_eval = get_network()
                    eval_labs = label_syn
                    with torch.no_grad():
                        image_save = image_syn
                    image_syn_eval = copy.deepcopy(image_save.detach())
                    label_syn_eval = copy.deepcopy(eval_labs.detach())
                    evaluate(net_eval, image_syn_eval, label_syn_eval, syn_lr.item())
                save_this_it = True
#<slot>
            with torch.no_grad():
                _standin.save(args.save_dir, "images", it, image_syn)
                _standin.save(args.save_dir, "labels", it, label_syn)
                _standin.save(args.save_dir, "lr", it, syn_lr)
#<slot>
        student_net = get_network()
        expert_trajectory = buffer[expert_idx]
        expert_idx += 1
        if expert_idx == len(buffer):
            expert_idx = 0
            random.shuffle(buffer)
        start_epoch = np.random.randint(0, args.max_start_epoch)
#<slot>
        grand_loss = optimizer.step(closure)
"""

# FTD: MTT plus the EMA of the images (FTD's L148, L235-244, L358-419, L535).
FTD = (
    MTT.replace(
        "#<slot>\n#<slot>\n    expert_files",
        "#<slot>\n#<slot>\n    ema = _standin.ModelEma([image_syn], decay=args.ema_decay)\n"
        "    expert_files",
    )
    .replace(
        "                    evaluate(net_eval, image_syn_eval, label_syn_eval, syn_lr.item())\n",
        "                    evaluate(net_eval, image_syn_eval, label_syn_eval, syn_lr.item())\n"
        "                    with torch.no_grad():\n"
        "                        ema_image_syn = ema.module[0]\n"
        "                    evaluate(net_eval, ema_image_syn, label_syn_eval, syn_lr.item())\n",
    )
    .replace(
        '                _standin.save(args.save_dir, "lr", it, syn_lr)\n#<slot>\n',
        '                _standin.save(args.save_dir, "lr", it, syn_lr)\n#<slot>\n'
        "            with torch.no_grad():\n"
        '                _standin.save(args.save_dir, "ema", it, ema_image_syn)\n#<slot>\n',
    )
    .replace(
        "        grand_loss = optimizer.step(closure)\n",
        "        grand_loss = optimizer.step(closure)\n        ema.update([image_syn])\n",
    )
)

# DATM: seeds everything at the start of main (L33), sets CUDA_VISIBLE_DEVICES from its config
# (L35), learns soft-label logits (made a leaf after the images, L324-326) and gates the step.
DATM = (
    MTT.replace(
        "def main(args):\n#<slot>\n",
        "def main(args):\n"
        "    random.seed(0)\n    np.random.seed(0)\n    torch.manual_seed(0)\n"
        "    os.environ['CUDA_VISIBLE_DEVICES'] = ','.join(str(x) for x in args.device)\n"
        "#<slot>\n",
    )
    .replace(
        "    syn_lr = syn_lr.detach().requires_grad_(True)\n",
        "    syn_lr = syn_lr.detach().requires_grad_(True)\n"
        "    logits = torch.nn.functional.one_hot(label_syn, args.classes).double() * 2.0\n"
        "    label_syn = copy.deepcopy(logits.detach()).requires_grad_(True)\n",
    )
    .replace(
        "        grand_loss = optimizer.step(closure)\n",
        "        grand_loss = param_loss = optimizer.step(\n"
        "            closure, skip_if=datm.gate(args.threshold))\n"
        '        if optimizer.last_step.skipped == "gate":\n'
        "            print('falts', start_epoch)\n",
    )
    .replace(
        "        start_epoch = np.random.randint(0, args.max_start_epoch)\n",
        "        start_epoch = np.random.randint(args.min_start_epoch, args.max_start_epoch)\n",
    )
)

TEMPLATES = {"mtt": MTT, "ftd": FTD, "datm": DATM}
SAVED = {"mtt": ("images", "labels", "lr"), "ftd": ("images", "labels", "lr", "ema")}
SAVED["datm"] = SAVED["mtt"]


def recipe_runs(fork: str) -> list[list[str]]:
    """The runs of consecutive ``+`` lines of the page's "Several GPUs" diff, in order."""
    text = (ROOT / "docs" / "swap" / f"{fork}.md").read_text()
    section = text[text.index("\n## Several GPUs\n") :]
    block = re.search(r"^```diff\n(.*?)^```", section, re.S | re.M)
    assert block is not None, f"{fork}.md: no diff block under 'Several GPUs'"
    runs: list[list[str]] = []
    previous_plus = False
    for line in block.group(1).splitlines():
        plus = line.startswith("+") and not line.startswith("+++")
        if plus:
            if not previous_plus:
                runs.append([])
            runs[-1].append(line[1:])
        previous_plus = plus
    return runs


def fork_script(fork: str, edit: tuple[str, str] | None = None) -> str:
    """The stand-in fork with the page's recipe lines in its slots (``edit``: one textual
    replacement in the recipe, to break it on purpose)."""
    runs = recipe_runs(fork)
    template = TEMPLATES[fork]
    slots = template.count("#<slot>")
    assert len(runs) == slots, f"{fork}.md's recipe has {len(runs)} runs of + lines, not {slots}"
    body = template
    for run in runs:
        body = body.replace("#<slot>", "\n".join(run), 1)
    if edit is not None:
        assert edit[0] in body, edit[0]
        body = body.replace(edit[0], edit[1])
    prelude = PRELUDE.format(here=str(HERE), fork=fork)
    main = "\nif __name__ == '__main__':\n    main(_standin.args(save_dir=sys.argv[1]))\n"
    return prelude + body + main


def torchrun(script: str, ranks: int, out: Path) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True)
    path = out / "fork.py"
    path.write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={ranks}", str(path), str(out)]
    try:
        return subprocess.run(
            command, capture_output=True, text=True, timeout=300, env=env, cwd=out
        )
    except subprocess.TimeoutExpired as err:  # a hang fails the test, within the timeout
        raise AssertionError(f"torchrun with {ranks} ranks hung (killed after 300 s)") from err


def test_every_page_has_a_recipe_with_the_four_essentials() -> None:
    for fork in TEMPLATES:
        code = "\n".join("\n".join(run) for run in recipe_runs(fork))
        for needed in (
            "dist.init_process_group(",
            "use_local_gpu()",
            "Shard.current(",
            "take_shard(",
            "gather_shards(",
            "process_group=dist.group.WORLD",
            "shard=shard",
            "rank == 0",
        ):
            assert needed in code, (fork, needed)
        seeded = "seed_everything(0)" in code or fork == "datm"  # DATM seeds at its L33
        assert seeded, fork


@pytest.mark.parametrize("fork", ["mtt", "ftd", "datm"])
def test_the_recipe_on_two_ranks_saves_what_one_rank_saves(fork: str, tmp_path: Path) -> None:
    script = fork_script(fork)
    results = {}
    for ranks in (1, 2):
        out = tmp_path / f"ranks{ranks}"
        run = torchrun(script, ranks, out)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
        results[ranks] = out
    writers = {line.split()[0] for line in (results[2] / "writes.log").read_text().splitlines()}
    assert writers == {"0"}, "only rank 0 may write"
    iterations = (0, 2, 4)
    for name in SAVED[fork]:
        for it in iterations:
            one = torch.load(results[1] / f"{name}_{it}.pt", weights_only=True)
            two = torch.load(results[2] / f"{name}_{it}.pt", weights_only=True)
            if name != "lr":
                assert one.shape[0] == 9, (name, one.shape)  # the whole set, not a shard
            torch.testing.assert_close(two, one, rtol=0, atol=1e-10)
    first = torch.load(results[1] / "images_0.pt", weights_only=True)
    last = torch.load(results[1] / "images_4.pt", weights_only=True)
    assert (last - first).abs().max() > 1e-6  # the images were really stepped
    lr_first = torch.load(results[1] / "lr_0.pt", weights_only=True)
    assert torch.load(results[1] / "lr_4.pt", weights_only=True) != lr_first


def test_ranks_seeded_differently_stop_with_a_clear_error(tmp_path: Path) -> None:
    # seeds 0 and 1: the ranks draw start epochs 1 and 2 first (and shuffle the experts apart)
    edit = ("seed_everything(0)", 'seed_everything(int(os.environ["RANK"]))')
    run = torchrun(fork_script("mtt", edit), 2, tmp_path / "unseeded")
    assert run.returncode != 0
    output = run.stdout + run.stderr
    assert output.count("RankMismatchError") >= 2, output[-4000:]  # both ranks, no hang
    assert re.search(r"start_epoch: rank 0: \d+, rank 1: \d+", output), output[-4000:]
    assert "seed_everything" in output
    assert not (tmp_path / "unseeded" / "images_2.pt").exists()  # stopped at the first step


def test_a_different_expert_at_the_same_start_epoch_is_named() -> None:
    from _standin import load_buffer
    from sharp_bilevel.adapters.distributed import describe_disagreement, fingerprint

    experts = load_buffer("a")
    same = fingerprint(experts[0][1])
    assert fingerprint([t.clone() for t in experts[0][1]]) == same  # a copy: equal
    assert fingerprint(torch.cat([t.reshape(-1) for t in experts[0][1]])) == same  # flat: equal
    nudged = [t.clone() for t in experts[0][1]]
    nudged[-1][0] = torch.nextafter(nudged[-1][0], torch.tensor(2.0, dtype=torch.float64))
    assert fingerprint(nudged) != same  # one value one ulp away: differs
    rows = [
        [1, 2, 4, 7, fingerprint(experts[0][1]), fingerprint(experts[0][3])],
        [1, 2, 4, 7, fingerprint(experts[1][1]), fingerprint(experts[1][3])],
        [1, 2, 4, 7, fingerprint(experts[0][1]), fingerprint(experts[0][3])],
    ]
    message = describe_disagreement(rows, [0, 1, 2])
    assert message is not None
    assert "expert start parameters (fingerprint): rank 0: 0x" in message
    assert "expert target parameters" in message
    assert "rank 2: 0x" in message
    assert "start_epoch" not in message
    assert "seed_everything" in message
    assert describe_disagreement([rows[0], rows[2]], [0, 2]) is None


def test_use_local_gpu_and_seed_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    import numpy as np
    from sharp_bilevel.adapters import seed_everything, use_local_gpu

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    assert use_local_gpu() is None
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert use_local_gpu() == "5"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    with pytest.raises(RuntimeError, match="lists only 1 GPU"):
        use_local_gpu()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert use_local_gpu() == "1"
    draws = []
    for _ in range(2):
        seed_everything(3)
        legacy = float(np.random.rand())  # noqa: NPY002 (numpy's global generator, as forks use)
        draws.append((random.random(), legacy, float(torch.rand(()))))
    assert draws[0] == draws[1]
    with pytest.raises(ValueError, match="seed must be an int"):
        seed_everything(-1)
