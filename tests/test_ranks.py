"""Multi-rank clients (fedprompt/ranks.py): N data-parallel ranks give the one-rank update of
the same global batch; a rank that dies mid-round is an error, never a hang, and the ranks
restart. Real child processes over gloo on CPU."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from fedprompt import payload
from fedprompt.config import ConfigError
from fedprompt.local import LocalClient
from fedprompt.ranks import RankedClient, RankError
from tests.tiny import tiny_config

pytestmark = pytest.mark.slow


def _relative(a: dict, b: dict, start: dict) -> float:
    """|a - b| / |a - start| over all tensors: the two updates' difference, relative."""
    num = sum(float((a[k].double() - b[k].double()).norm() ** 2) for k in a)
    den = sum(float((a[k].double() - start[k].double()).norm() ** 2) for k in a)
    return (num / den) ** 0.5


def _configs(method: str, **sets):
    # The tiny llama has no dropout: the ranks' slices then see exactly what one rank sees.
    base = dict(train__lr=0.05, train__batch_size=4, train__local_steps=3, peft__lora_dropout=0.0) | sets
    return tiny_config("llama", method, **base), tiny_config("llama", method, client__ranks=2, **base)


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_two_ranks_give_the_one_rank_update(method):
    one_cfg, two_cfg = _configs(method)
    two = RankedClient(two_cfg, ranks=2)
    try:
        start = payload.extract(two.state.model)
        b = two.fit(start, round_num=2)
        assert two.backbone_loads >= 2 and two.group.loads == 1
        if method == "lora":  # a rank killed mid-round: an error within seconds, then a restart
            sent = two.group.send_fit

            def send_then_kill(tensors, **kw):
                sent(tensors, **kw)
                os.kill(two.group.children[0].pid, signal.SIGKILL)

            two.group.send_fit = send_then_kill
            t0 = time.monotonic()
            with pytest.raises(RankError, match="rank 1 of 2 exited \\(killed by SIGKILL\\)"):
                two.fit(start, round_num=2)
            assert time.monotonic() - t0 < 60
            two.group.send_fit = sent
            again = two.fit(start, round_num=2)  # the ranks restarted: the same update again
            assert two.group.loads == 2
            assert _relative(again.tensors, b.tensors, start) < 1e-5
    finally:
        two.close()
    a = LocalClient(one_cfg).fit(start, round_num=2)
    assert b.num_examples == a.num_examples
    assert b.metrics["train_loss"] == pytest.approx(a.metrics["train_loss"], rel=1e-5)
    assert _relative(b.tensors, a.tensors, start) < 1e-5


def test_ranks_refusals():
    with pytest.raises(ConfigError, match="train.batch_size: 6 is the global batch of client.ranks 4"):
        tiny_config("bert", client__ranks=4, train__batch_size=6)
    with pytest.raises(ConfigError, match="client.ranks: 0 is out of range"):
        tiny_config("bert", client__ranks=0)


@pytest.mark.parametrize("command", ["simulate", "train"])
def test_ranks_belong_to_fedprompt_client(capsys, tmp_path, command):
    from tests.test_cli import user_error

    user_error(capsys, [command, "--set", "client.ranks=2", "--output", str(tmp_path / "o")], "client.ranks: 2 applies to `fedprompt client`")
    user_error(capsys, ["client", "--ranks", "3", "--insecure"], "train.batch_size: 16 is the global batch of client.ranks 3 ranks")


def test_dp_sgd_on_two_ranks_clips_each_example_and_noises_once(tmp_path):
    """DP-SGD on 2 ranks, one SGD step from the same Poisson sample (the same secret seed):
    with almost no noise the update is the 1-rank update (each example clipped the same way);
    with sigma 1, two fits that differ only in their noise differ by lr x sqrt(2) x sigma x C /
    B per coordinate: one noise for the global batch (noised on both ranks it would be sqrt(2)
    times that; not noised, 0)."""
    sets = dict(
        privacy__mode="sample",
        privacy__target_epsilon=0,
        privacy__max_grad_norm=0.5,
        privacy__delta=1e-3,
        train__optimizer="sgd",
        train__momentum=0.0,
        train__lr=1.0,
        train__local_steps=1,
        train__warmup_steps=0,
        train__schedule="constant",
        deepspeed__gradient_clipping=0.0,
    )
    one_cfg, two_cfg = _configs("lora", privacy__noise_multiplier=1.0, **sets)
    two = RankedClient(two_cfg, ranks=2, say=lambda _: None, state_dir=tmp_path / "two")
    try:
        start = payload.extract(two.state.model)
        # Rank 0 alone adds the noise: its sigma is the client's (the child's config is unused).
        two.cfg.privacy.noise_multiplier = 1e-6
        quiet = two.fit(start, round_num=1, dp_seed=12345).tensors
        two.cfg.privacy.noise_multiplier = 1.0
        a, b = (two.fit(start, round_num=1, dp_seed=12345).tensors for _ in range(2))
    finally:
        two.close()
    one_cfg.privacy.noise_multiplier = 1e-6
    one = LocalClient(one_cfg, state_dir=tmp_path / "one").fit(start, round_num=1, dp_seed=12345).tensors
    assert _relative(quiet, one, start) < 1e-4
    diff = torch.cat([(a[k].double() - b[k].double()).flatten() for k in a])
    expected = 1.0 * 2**0.5 * 1.0 * 0.5 / 4  # lr x sqrt(2) x sigma x C / expected batch
    assert diff.numel() >= 1000 and diff.std().item() == pytest.approx(expected, rel=0.1)
