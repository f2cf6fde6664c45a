"""``[agents.NAME]`` tables: inheritance from the shared sections, layering, and one-line errors."""

import pytest

from runtime import agent_config


def resolve(*argv):
    return agent_config.resolve_multi(list(argv), prog="launch")


def error_of(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        resolve(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    return err


def test_multi_agent_runs_are_recognised(tmp_path):
    assert agent_config.requested(["--recipe", "coevolve"])
    assert not agent_config.requested([]) and not agent_config.requested(["--recipe", "copy4"])
    config = tmp_path / "a.toml"
    config.write_text("[agents.x]\nlr = 1e-4\n")
    assert agent_config.requested(["--config", str(config)])


def test_agent_tables_inherit_the_shared_sections_and_layer(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[optimizer]\nlr = 0.003\n\n[agents.solver]\nmax_staleness = 3\n\n"
                      "[agents.critic]\nfrozen = true\nhidden_size = 32\n")
    mc = resolve("--recipe", "coevolve", "--config", str(config), "--agent", "solver.num_steps=7",
                 "--num-layers", "3", "--episode-timeout", "9")
    solver, critic = mc.agents["solver"], mc.agents["critic"]
    assert solver.max_staleness == 3 and solver.num_steps == 7 and solver.lr == 3e-4  # the recipe's lr wins
    assert critic.frozen and critic.hidden_size == 32 and critic.lr == 0.003 and critic.num_layers == 3
    assert mc.agents["proposer"].groups_per_episode == 1 and mc.episodes.episode_timeout == 9


@pytest.mark.parametrize(("argv", "names"), [
    (["--agent", "solver.max_staleness=-1"], "[agents.solver] max_staleness"),
    (["--agent", "solver.bogus=1"], "[agents.solver] bogus"),
    (["--agent", "solver.groups_per_episode=20"], "[agents.solver] groups_per_episode"),
    (["--agent", "solver.hidden_size=30"], "[agents.solver] hidden_size"),
    (["--agent", "solver.num_query_groups=3"], "[agents.solver] num_query_groups"),
    (["--agent", "solver.frozen=true", "--agent", "proposer.frozen=true"], "[agents]"),
    (["--agent", "9lives.lr=1"], "[agents.9lives]"),
    (["--agent", "solver"], "--agent"),
    (["--episode-fn", "nocolon"], "--episode-fn"),
    (["--eval-episodes", "-1"], "[episodes] eval_episodes"),
    (["--actor-num-gpus-per-node", "1"], "--actor-num-gpus-per-node"),
])
def test_an_invalid_agent_config_is_one_line_naming_the_field(capsys, argv, names):
    assert names in error_of(capsys, "--recipe", "coevolve", *argv)
