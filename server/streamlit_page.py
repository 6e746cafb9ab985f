"""What the Streamlit pages (web_demo2.py, composite_demo/main.py) share: refusing to serve with a reason, the
check that Streamlit listens where --host / --port say, the login form of --auth, and `python SCRIPT FLAGS` starting
Streamlit itself."""

from __future__ import annotations

import hmac
import os
import sys

import streamlit as st

_reported: set[str] = set()

DEFAULT_PORT = 8501
# Settings for any start: local only, no usage statistics, no Deploy button (.streamlit/config.toml says the same
# for `streamlit run` from the repository root).
STREAMLIT_FLAGS = ["--server.headless", "true", "--browser.gatherUsageStats", "false",
                   "--client.toolbarMode", "minimal", "--server.maxUploadSize", "1"]


def run_streamlit(script_file: str, argv: list[str], parse) -> int:
    """`python SCRIPT FLAGS`: check the flags here (parse(argv)), then become `streamlit run SCRIPT` listening where
    they say (--host, --port; default 127.0.0.1:8501). Returns 2 on a bad flag (said on stderr)."""
    try:
        args = parse(argv)
    except FlagError as e:
        print(e, file=sys.stderr)
        return 2
    os.execv(sys.executable, [sys.executable, "-m", "streamlit", "run", os.path.abspath(script_file),
                              "--server.address", args.host or "127.0.0.1",
                              "--server.port", str(args.port or DEFAULT_PORT), *STREAMLIT_FLAGS, "--", *argv])
    return 0  # not reached: execv replaced this process


def under_streamlit() -> bool:
    """Whether this process is a Streamlit server running the page (else it was started as `python SCRIPT`)."""
    from streamlit import runtime

    return runtime.exists()


class FlagError(ValueError):
    """A bad command-line flag; the message is argparse's usage and error."""


def parse_args(ap, argv: list[str]):
    """ap's flags, with host / port None where not given (so whatever Streamlit was told holds); FlagError
    instead of exiting on a bad one; args.logins from --auth."""
    from model.flags import logins

    ap.set_defaults(host=None, port=None)

    def error(message):
        raise FlagError(f"{ap.format_usage()}{ap.prog}: error: {message}")

    ap.error = error
    args = ap.parse_args(argv)
    try:
        args.logins = logins(args.auth)
    except (OSError, ValueError) as e:
        error(f"--auth: {e}")
    return args


def open_page(argv: list[str], parse, get_service, script: str, runs_streamlit: bool):
    """(args, service) for a page run: the flags, the --host check, the login, then the service (made once per
    process by get_service); anything wrong is said in the page and ends the run."""
    from model.flags import ModelLoadError

    try:
        args = parse(argv)
    except FlagError as e:
        refuse(str(e), script)
    problem = binding_problem(args, script, runs_streamlit)
    if problem:
        refuse(problem, script)
    if not logged_in(args.logins):
        st.stop()
    try:
        return args, get_service(tuple(argv))
    except ModelLoadError as e:
        refuse(f"The model could not be loaded. {e}", script)


def refuse(message: str, script: str) -> None:
    """Say what is wrong in the page and (once) in the terminal, and serve nothing else."""
    if message not in _reported:
        _reported.add(message)
        print(f"{script}: {message}", file=sys.stderr, flush=True)
    st.error(message)
    st.stop()


def binding_problem(args, script: str, runs_streamlit: bool) -> str | None:
    """Why the address / port Streamlit listens on is not the one the flags ask for (None: they agree).
    runs_streamlit: `python SCRIPT` starts Streamlit itself with the flags (else only `streamlit run` does)."""
    bound, host = st.get_option("server.address"), args.host or "127.0.0.1"
    if (bound or "0.0.0.0") != host:
        where = f"listens on {bound}" if bound else "listens on every interface"
        run = f"`streamlit run {script} --server.address {host} -- ...`"
        start = f"`python {script} --host {host}` (or {run})" if runs_streamlit else run
        return f"Streamlit {where} but --host is {host}: start with {start}."
    port = st.get_option("server.port")
    if args.port is not None and args.port != port:
        start = (f"`python {script} --port {args.port}`" if runs_streamlit
                 else f"`streamlit run {script} --server.port {args.port} -- ...`")
        return f"Streamlit listens on port {port} but --port is {args.port}: start with {start}."
    return None


def logged_in(pairs: list[tuple[str, str]]) -> bool:
    """True once this browser session has given one of the logins (always, with none configured)."""
    state = st.session_state
    if not pairs or state.get("user"):
        return True
    with st.form("login"):
        st.markdown("**Log in to chat**")
        user = st.text_input("User")
        password = st.text_input("Password", type="password")
        if st.form_submit_button("Log in"):
            ok = False
            for u, p in pairs:  # every pair compared, in constant time: the answer's timing says nothing
                ok |= hmac.compare_digest(user.encode(), u.encode()) & hmac.compare_digest(password.encode(),
                                                                                          p.encode())
            if ok:
                state.user = user
                st.rerun()
            st.error("Wrong user or password.")
    return False
