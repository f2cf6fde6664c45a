import subprocess
import sys

import pytest

from runtime import cli
from runtime.config import ConfigError, build, to_toml_dict


def test_defaults_recipe_toml_and_flags_layer_in_order(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[rollout]\nrollout_batch_size = 32\nglobal_batch_size = 256\n[optimizer]\nlr = 0.5\n")
    cfg = cli.resolve(["--config", str(toml), "--lr", "0.25", "--max-staleness", "3", "--use-tis"])
    assert cfg.rollout.rollout_batch_size == 32 and cfg.rollout.global_batch_size == 256
    assert cfg.optimizer.lr == 0.25  # the flag beats the file
    assert cfg.async_.max_staleness == 3 and cfg.grpo.use_tis is True
    assert cfg.rollout.rollout_max_response_len == 6  # from the default recipe
    assert cfg.rollout.groups_per_step == 32


def test_the_staleness_bound_is_the_buffers_and_an_explicit_capacity_only_lowers_it():
    from runtime.agent_config import single
    from runtime.agents import _buffer

    for flags, capacity in ((["--max-staleness", "3"], 4 * 16), (["--buffer-capacity", "20"], 20),
                            (["--max-staleness", "0", "--buffer-capacity", "40"], 16)):
        spec = single(cli.resolve(flags))
        assert _buffer(spec.base, spec.agents["policy"]).capacity == capacity

def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = cli.resolve(["--eps-clip-high", "0.28", "--run-dir", "x"])
    path = tmp_path / "config.toml"
    path.write_text(cli.dumps_toml(to_toml_dict(cfg)))
    again = cli.resolve(["--config", str(path)])
    assert again == cfg


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--lr", "-1"], "--lr"),
        (["--lr", "abc"], "--lr"),
        (["--max-staleness", "-1"], "--max-staleness"),
        (["--rollout-batch-size", "3"], "--global-batch-size"),  # 3 x 8 != 128 x 1
        (["--global-batch-size", "100"], "--global-batch-size"),  # not whole groups
        (["--buffer-capacity", "2"], "--buffer-capacity"),
        (["--recipe", "nope"], "--recipe"),
        (["--custom-rm-path", "no_colon"], "--custom-rm-path"),
        (["--kl-loss-type", "k9"], "--kl-loss-type"),
        (["--min-lr", "1", "--lr", "0.1"], "--min-lr"),
        (["--lr-decay-style", "cosine", "--lr-warmup-iters", "5", "--lr-decay-iters", "5"], "--lr-warmup-iters"),
        (["--lr-decay-style", "step"], "--lr-decay-style"),
        (["--loss-type", "sft_loss"], "--loss-type"),  # no --prompt-data
        (["--lora-rank", "8", "--weight-transport", "gloo"], "--weight-transport"),
        (["--no-such-flag"], "--no-such-flag"),
        (["--hidden-size", "100", "--num-attention-heads", "3"], "--hidden-size"),  # no --kv-channels
        (["--num-query-groups", "3"], "--num-query-groups"),  # 4 heads
    ],
)
def test_bad_values_exit_2_with_one_line_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli.resolve(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


def test_kv_channels_sets_a_head_size_the_hidden_size_does_not_divide():
    cfg = cli.resolve(["--hidden-size", "100", "--num-attention-heads", "3", "--num-query-groups", "1",
                       "--kv-channels", "32"])
    assert (cfg.model.hidden_size, cfg.model.kv_channels) == (100, 32)


def test_bad_toml_field_names_its_path(tmp_path, capsys):
    (tmp_path / "a.toml").write_text("[rollout]\nrollout_batch_sise = 4\n")
    with pytest.raises(SystemExit):
        cli.resolve(["--config", str(tmp_path / "a.toml")])
    assert "[rollout] rollout_batch_sise: unknown field" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"\[nope\]"):
        build({"nope": {}})


def test_launch_rejects_bad_flag_before_starting_anything(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "runtime.launch", "--run-dir", str(tmp_path / "r"),
                           "--eps-clip", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m runtime.launch: error: --eps-clip: Expected `float` > 0.0"
    ]
    assert not (tmp_path / "r").exists()


def test_help_is_grouped_like_miles_plus_async():
    text = cli.build_parser().format_help()
    for title in ["MODEL", "CKPT", "ROLLOUT", "EVAL", "PERF", "GRPO", "OPTIMIZER", "ASYNC"]:
        assert f"\n{title}:" in text
    async_part = text.split("\nASYNC:")[1]
    assert "--max-staleness" in async_part and "--buffer-capacity" in async_part
