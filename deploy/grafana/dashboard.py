"""The Grafana dashboard ``deploy/grafana/csil.json``, generated with Grafana's own SDK (grafana-foundation-sdk).

    python deploy/grafana/dashboard.py            # rewrite csil.json
    python deploy/grafana/dashboard.py --check    # exit 1 if csil.json differs from what this file generates

Edit panels here, never the JSON: tests/test_monitoring.py fails when the checked-in JSON drifts from this
generator, and runs every query below against a real Prometheus scraping a real run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common, dashboard, prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode, LegendPlacement, SortOrder, TooltipDisplayMode
from grafana_foundation_sdk.models.dashboard import DashboardCursorSync, DataSourceRef

OUT = Path(__file__).with_name("csil.json")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="csil-prometheus")  # provisioning/datasources/prometheus.yml

# (row, [(title, unit, min 0?, description, [(expr, legend), ...]), ...]); each panel is 8 wide unless it is a row's
# only one. Units are Grafana's ("short", "percentunit", "s", "ms").
ROWS = [
    ("Actors", [
        ("Env steps/s", "short", True, "Transitions written to replay per second.", [
            ("sum by (actor) (rate(ray_csil_actor_env_steps_total[1m]))", "actor {{actor}}"),
            ("sum(rate(ray_csil_actor_env_steps_total[1m]))", "all actors")]),
        ("Episodes / min", "short", True, "", [
            ("60 * sum by (actor) (rate(ray_csil_actor_episodes_total[5m]))", "actor {{actor}}")]),
        ("Training success rate (5 min)", "percentunit", True,
         "Successful episodes / finished episodes of the acting (stochastic) policy.", [
             ("(sum by (actor) (rate(ray_csil_actor_episode_successes_total[5m])) or 0 * sum by (actor) "
              "(rate(ray_csil_actor_episodes_total[5m]))) / sum by (actor) (rate(ray_csil_actor_episodes_total[5m]))",
              "actor {{actor}}")]),
        ("Episode return and length (5 min mean)", "short", True, "", [
            ("sum(rate(ray_csil_actor_episode_return_sum[5m])) / sum(rate(ray_csil_actor_episode_return_count[5m]))",
             "return"),
            ("sum(rate(ray_csil_actor_episode_length_sum[5m])) / sum(rate(ray_csil_actor_episode_length_count[5m]))",
             "length (steps)")]),
        ("Base-policy chunk request latency", "s", True,
         "One batched infer_batch call for the envs whose chunk ran out; failed attempt cycles (server "
         "unreachable) per second.", [
             ("histogram_quantile(0.5, sum by (le) (rate(ray_csil_actor_chunk_request_seconds_bucket[1m])))", "p50"),
             ("histogram_quantile(0.95, sum by (le) (rate(ray_csil_actor_chunk_request_seconds_bucket[1m])))", "p95"),
             ("sum(rate(ray_csil_actor_base_policy_outages_total[5m])) or vector(0)", "failed attempts/s")]),
        ("Weight version lag", "short", True,
         "Newest published weight version minus the version the actor acted with (learner updates).", [
             ("max by (actor) (ray_csil_actor_weight_version_lag)", "actor {{actor}}")]),
        ("Time held back by the rate limiter", "percentunit", True,
         "Fraction of wall time the actor's replay inserts waited.", [
             ("sum by (actor) (rate(ray_csil_actor_rate_limited_seconds_total[1m]))", "actor {{actor}}")]),
    ]),
    ("Learner", [
        ("Updates/s", "short", True, "", [
            ("sum(rate(ray_csil_learner_updates_total[1m]))", "fused updates/s"),
            ("60 * sum(rate(ray_csil_learner_weights_published_total[1m]))", "weights published / min")]),
        ("Fused updates per env step", "short", True, "Each fused update does utd critic steps and one actor step.", [
            ("sum(rate(ray_csil_learner_updates_total[1m])) / sum(rate(ray_csil_actor_env_steps_total[1m]))",
             "updates / env step")]),
        ("Time waiting for samples", "percentunit", True, "", [
            ("sum(rate(ray_csil_learner_sample_wait_seconds_total[1m]))", "waiting")]),
        ("Losses", "short", False, "", [('max by (key) (ray_csil_learner_stat{key=~".*loss.*"})', "{{key}}")]),
        ("Q values", "short", False, "", [('max by (key) (ray_csil_learner_stat{key=~"q_.*"})', "{{key}}")]),
        ("Rewards", "short", False, "Mean coherent reward of the online and demo halves of the batch.", [
            ('max by (key) (ray_csil_learner_stat{key=~"reward_(online|demo|mean)"})', "{{key}}")]),
        ("Regularisation: KL to BC / alpha, entropy", "short", False, "", [
            ('max by (key) (ray_csil_learner_stat{key=~"kl_to_bc|alpha|entropy|reward_kl_estimate"})', "{{key}}")]),
        ("Reward refinement gradient norm", "short", False,
         "Global norm of the reward network's gradient before its clip (AgentConfig.reward_grad_clip, 75): a norm "
         "that stays above the clip means π_R's likelihood is too sharp for its SGD step.", [
            ('max by (key) (ray_csil_learner_stat{key="reward_grad_norm"})', "{{key}}")]),
        ("Seconds per update", "s", True, "Mean over each 100-update window, sample waits excluded.", [
            ("sum(rate(ray_csil_learner_update_seconds_sum[5m])) / sum(rate(ray_csil_learner_update_seconds_count[5m]))",
             "mean"),
            ("histogram_quantile(0.95, sum by (le) (rate(ray_csil_learner_update_seconds_bucket[5m])))", "p95")]),
    ]),
    ("Replay", [
        ("Table size", "short", True, "Items; fill = size / capacity.", [
            ("max by (table) (ray_csil_replay_table_size)", "{{table}}"),
            ("max by (table) (ray_csil_replay_table_size) / max by (table) (ray_csil_replay_table_max_size)",
             "{{table}} fill")]),
        ("Inserts and samples / s", "short", True, "", [
            ("sum by (table) (rate(ray_csil_replay_inserts_total[1m]))", "{{table}} inserts"),
            ("sum by (table) (rate(ray_csil_replay_samples_total[1m]))", "{{table}} samples")]),
        ("Samples per insert (online)", "short", True, "Rate limiter target: utd x batch size.", [
            ('sum(rate(ray_csil_replay_samples_total{table="online"}[1m])) / '
             'sum(rate(ray_csil_replay_inserts_total{table="online"}[1m]))', "online")]),
        ("Rate-limiter waits", "percentunit", True,
         "Fraction of time the table worker waited: for sampling = inserts held back, for inserts = samples held "
         "back.", [
             ("sum by (table, waiting_for) (rate(ray_csil_replay_rate_limiter_wait_seconds_total[1m]))",
              "{{table}} waiting for {{waiting_for}}")]),
    ]),
    ("Inference", [
        ("Requests/s", "short", True, "", [
            ("sum by (ingress) (rate(ray_csil_inference_requests_total[1m]))", "{{ingress}}"),
            ("sum by (ingress) (rate(ray_csil_inference_errors_total[1m])) or vector(0)", "errors {{ingress}}")]),
        ("Observations/s and mean batch size", "short", True, "", [
            ("sum(rate(ray_csil_inference_batch_size_sum[1m]))", "observations/s"),
            ("sum(rate(ray_csil_inference_batch_size_sum[1m])) / sum(rate(ray_csil_inference_batch_size_count[1m]))",
             "mean batch size")]),
        ("Model and request time", "ms", True, "", [
            ("histogram_quantile(0.5, sum by (le) (rate(ray_csil_inference_model_ms_bucket[1m])))", "model p50"),
            ("histogram_quantile(0.95, sum by (le) (rate(ray_csil_inference_model_ms_bucket[1m])))", "model p95"),
            ("histogram_quantile(0.95, sum by (le, ingress) (rate(ray_csil_inference_request_ms_bucket[1m])))",
             "request p95 {{ingress}}")]),
    ]),
    ("Run", [
        ("Component restarts", "short", True,
         "In-run restarts per component (cumulative): env actors restarted by Ray, learner and replay restored from "
         "their last checkpoint, inference replicas replaced by Serve, evaluation rollout workers retried. A "
         "component that keeps dying ends the run.", [
             ("max by (component) (ray_csil_component_restarts)", "{{component}}")]),
        ("Restarts in the last 10 min (crash-loop guard)", "short", True,
         "Restarts per component within the last 10 minutes: the fourth restart of a component within 10 minutes "
         "ends the run (orchestration.faults.RestartBudget), with its last good checkpoint kept.", [
             ("max by (component) (max_over_time(ray_csil_component_restarts[10m]) - "
              "min_over_time(ray_csil_component_restarts[10m]))", "{{component}}")]),
    ]),
]


def _panel(title: str, unit: str, min_zero: bool, description: str, queries: list[tuple[str, str]], width: int):
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE).unit(unit)
             .height(8).span(width).line_width(1).fill_opacity(10).show_points("never").span_nulls(True)
             .legend(common.VizLegendOptions().display_mode(LegendDisplayMode.LIST)
                     .placement(LegendPlacement.BOTTOM).show_legend(True))
             .tooltip(common.VizTooltipOptions().mode(TooltipDisplayMode.MULTI).sort(SortOrder.NONE)))
    if min_zero:
        panel = panel.min(0)
    for i, (expr, legend) in enumerate(queries):
        panel = panel.with_target(prometheus.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i))
                                  .datasource(DATASOURCE))
    return panel


def build() -> dict:
    """The dashboard as Grafana's JSON model."""
    board = (dashboard.Dashboard("csil").uid("csil").tags(["csil", "ray"]).timezone("browser").editable()
             .refresh("10s").time("now-30m", "now").tooltip(DashboardCursorSync.CROSSHAIR)
             .description("csil actor-learner system: env actors, learner, Reverb replay, inference server, "
                          "restarts and faults (metrics: deploy/METRICS.md)"))
    for row, panels in ROWS:
        board = board.with_row(dashboard.Row(row))
        for title, unit, min_zero, description, queries in panels:
            board = board.with_panel(_panel(title, unit, min_zero, description, queries, 12 if len(panels) <= 2 else 8))
    return json.loads(JSONEncoder(sort_keys=True, indent=2).encode(board.build()))


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if csil.json differs from the generated dashboard")
    args = p.parse_args()
    text = render()
    if args.check:
        if OUT.read_text() != text:
            sys.exit(f"{OUT} differs from what {__file__} generates: run python {__file__}")
        return
    OUT.write_text(text)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
