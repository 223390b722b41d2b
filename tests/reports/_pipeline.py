"""``python -m tests.reports._pipeline <qmri-bids arguments>``: the real CLI with the report hooks
attached from outside, as the CLI will call them once integrated (qmri_bids/cli/run.py is not
ours to edit). Each hook is one call into ``qmri_bids.reports``:

* ``NodeTimer`` as the MultiProc plugin's ``status_callback``;
* ``new_run_record(config, inputs)`` per participant when the workflow is built;
* ``finish_run_record`` + ``write_run_record`` per participant after the run, then
  ``build_reports(output_dir)`` (participant reports, IQM tables, logs/CITATION.*).

Run in a fresh process: the workers are forked, and torch must not have run in the parent.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    from qmri_bids import reports
    from qmri_bids.cli import run
    from qmri_bids.runner import SupervisedMultiProcPlugin
    from qmri_bids.workflows import base

    timer = reports.NodeTimer()
    state: dict = {"records": [], "plugin": None}

    plugin_init = SupervisedMultiProcPlugin.__init__

    def init(self, plugin_args=None):
        plugin_init(self, plugin_args={**(plugin_args or {}), "status_callback": timer})
        state["plugin"] = self

    SupervisedMultiProcPlugin.__init__ = init

    build_wf = base.init_qmri_bids_wf

    def init_wf(*, config, subjects):
        state["records"] = [reports.new_run_record(config, s, command=["qmri-bids", *argv])
                            for s in subjects]
        return build_wf(config=config, subjects=subjects)

    base.init_qmri_bids_wf = init_wf

    participant_level = run.run_participant_level

    def run_participant_level(config, log_file):
        code = participant_level(config, log_file)
        plugin = state["plugin"]
        failures = [{"fullname": f.node, "text": f.traceback, "crash_file": f.crash_file}
                    for f in (plugin.failures if plugin is not None else [])]
        for record in state["records"]:
            reports.finish_run_record(record, status="finished" if code == 0 else "failed",
                                      exit_code=code, nodes=timer.records,
                                      log_dir=config.log_dir(record.subject),
                                      failures=failures)
            reports.write_run_record(record, config.output_dir)
        reports.build_reports(config.output_dir)
        return code

    run.run_participant_level = run_participant_level
    return run.main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
