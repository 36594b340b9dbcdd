"""
The run machinery: everything a command needs besides the method, so that mos.py, train.py, latency.py and
search.py read as the method and call this in a line each. Imports nothing of the project (it sits below data/).

    settings.py      --key=value settings, checked before anything is read or written; arch files and whether an
                     arch lies in its space; devices
    folders.py       the run-folder contract: where a command may write and what --overwrite may delete
    files.py         atomic writes, JSON, JSON-lines and text files, one writer per folder (flock), a cache
    checkpoints.py   plain-dict checkpoints: checksummed, loaded with weights_only=True, checked whole; the
                     snapshots averaged before the final test
    signals.py       Ctrl-C and SIGTERM end a command in one line; a command's entry point
    machine.py       the machine a figure was measured on and its load; whether bf16 is native here
    loop.py          a run's settings on resume and the files it reads, data-parallel ranks, the throughput meter
                     and log lines, the guard against non-finite steps
    latency_files.py the latency dataset CSV (appended, resumed, checked), the predictor JSON, the outputs
                     latency.py claims before it measures, search.py's latency budgets
    plots.py         the pictures: the latency predictor's scatter, the search's candidates and convergence
"""
