"""Run twistd with bench instrumentation:

    python bench/twistd_wrapper.py [--profile OUT.prof [--profile-signals]]
                                   [--switchinterval S] [--words-groups] -- TWISTD-ARGS

``--profile``: cProfile the reactor (main) thread and dump it on reactor shutdown.
With ``--profile-signals`` the profiler starts disabled: SIGUSR1 enables it and SIGUSR2
disables it (the load generator sends them around its measurement window, so set-up,
logins, group joins and teardown are not in the profile).
(``python -m cProfile -o OUT $(which twistd) ...`` writes nothing when the realm is
stopped by a signal: after a signal-initiated shutdown twistd re-raises that signal on
itself, ``ApplicationRunner._exitSignal``, so cProfile's ``finally`` never runs.)
The SQLite writer/reader and argon2 threads are not profiled.

``--switchinterval``: ``sys.setswitchinterval(S)`` before starting, to measure how much
GIL hand-off between the reactor and the SQLite writer thread costs (default 0.005).

``--words-groups``: make ``twistd words --group NAME`` work on Python 3 (Twisted 26.10's
``twisted.words.tap.Options.opt_group`` calls ``str.decode`` and fails), so the IRC bench
can give twisted.words a channel to join: its realm creates no group on JOIN
(``createGroupOnRequest = False``).  Only the option parsing is changed.

"""

import sys

args = sys.argv[1:]
split = args.index("--")
opts, twistd_args = args[:split], args[split + 1 :]
profile_out = None
profile_signals = False
while opts:
    opt = opts.pop(0)
    if opt == "--profile":
        profile_out = opts.pop(0)
    elif opt == "--profile-signals":
        profile_signals = True
    elif opt == "--switchinterval":
        sys.setswitchinterval(float(opts.pop(0)))
    elif opt == "--words-groups":
        from twisted.words import tap as words_tap

        def opt_group(self: words_tap.Options, name: str) -> None:
            """Specify a group which should exist"""
            self["groups"].append(name)

        words_tap.Options.opt_group = opt_group  # type: ignore[method-assign]
    else:
        sys.exit(f"twistd_wrapper: unknown option {opt}")
sys.argv = ["twistd", *twistd_args]

from twisted.internet import reactor  # noqa: E402  (the default reactor, as twistd picks)

if profile_out is not None:
    import cProfile

    prof = cProfile.Profile()

    def _dump() -> None:
        prof.disable()
        prof.dump_stats(profile_out)

    reactor.addSystemEventTrigger("after", "shutdown", _dump)
    if profile_signals:
        import signal

        signal.signal(signal.SIGUSR1, lambda *_: prof.enable())
        signal.signal(signal.SIGUSR2, lambda *_: prof.disable())
    else:
        prof.enable()

from twisted.scripts.twistd import run  # noqa: E402

run()
