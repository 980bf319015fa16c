"""Command line: `python -m gateway {run,init,check-policy,explain,...}`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from gateway import __version__
from gateway.about import DEFAULT_CONFIG, enclosing_repository, is_packaged_default, version_text
from gateway.clock import Clock, ClockFileError, SimulatedClock
from gateway.config import (
    ENV_PREFIX,
    INSTANCE_ID_PATTERN,
    ConfigError,
    GatewayConfig,
    KeysConfig,
    load_config,
    read_config_file,
    read_secret,
)
from gateway.core import (
    ApplySettings,
    DecisionContext,
    Drop,
    Forward,
    Hold,
    LocationMode,
    SettingsSnapshot,
    VehicleState,
    decide,
    state_from_snapshot,
)
from gateway.core.decide import SETTINGS_TOPIC, split_vehicle_topic
from gateway.keys import KeyFileError, read_key
from gateway.logs import setup_logging
from gateway.policy import (
    CompiledPolicy,
    CompiledRoute,
    PolicyError,
    check_egress,
    declared_recipients,
    load_policy,
    summary_rows,
)
from telematics.v1 import privacy_pb2

if TYPE_CHECKING:
    from gateway.control.api import ControlPlane
    from gateway.service import GatewayService
    from gateway.statedir import OpenState

log = logging.getLogger("gateway")
CONTROL_TOKEN_ENV = "GATEWAY_CONTROL_TOKEN"
EXIT_CONFIG = 2
EXIT_UNCHECKED = 3  # audit verify: chain intact, content not checkable (no key)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default in its help, except where there is none to show
    (no value, a plain flag) or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default:" in text:
            return action.help
        return super()._get_help_string(action)


class VersionAction(argparse.Action):
    """`--version`: the release and, in a git checkout, the commit (looked up only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **_: Any) -> None:
        super().__init__(
            option_strings,
            dest,
            default=argparse.SUPPRESS,
            nargs=0,
            help="print the version (and the commit of a checkout) and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Privacy gateway between connected vehicles and the telematics backend.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        parent: argparse._SubParsersAction[argparse.ArgumentParser], name: str, **kwargs: Any
    ) -> argparse.ArgumentParser:
        return parent.add_parser(name, formatter_class=HelpFormatter, **kwargs)

    run = command(
        sub, "run", help="run the gateway", description="Run the gateway until SIGTERM/SIGINT."
    )
    run.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG),
        help="runtime config (TOML; $GATEWAY_CONFIG when set). Every key can also be set"
        " by a GATEWAY_* environment variable (nested keys joined by __, e.g."
        " GATEWAY_LIMITS__NEW_VEHICLES_PER_S); flags > environment > file > defaults",
    )
    run.add_argument(
        "--vehicle-broker",
        metavar="URL",
        help="vehicle-side broker, mqtt://[user:password@]host:port or mqtts://... "
        "(default: vehicle_broker.url of the config)",
    )
    run.add_argument(
        "--backend-broker",
        metavar="URL",
        help="backend-side broker URL (default: backend_broker.url of the config)",
    )
    run.add_argument(
        "--state-dir",
        type=Path,
        help="directory of the consent store and generated key (default: state_dir of the config)",
    )
    run.add_argument("--policy", type=Path, help="policy file (default: policy of the config)")
    run.add_argument(
        "--instance-id",
        metavar="ID",
        help="suffix of both MQTT client ids (default: generated once per state directory;"
        ' "legacy": the client ids exactly as configured)',
    )
    run.add_argument(
        "--control-listen",
        metavar="HOST:PORT",
        help='control plane address ("" disables, port 0 picks one; '
        "default: control.listen of the config)",
    )
    run.add_argument("--json-logs", action="store_true", help="log JSON lines to stderr")
    run.add_argument(
        "--simulated-clock",
        type=Path,
        metavar="FILE",
        help="TESTING ONLY: run every time-based rule on the simulator's compressed time, read"
        " from FILE (written by the vehicle simulator); never in production, and deliberately"
        " not a configuration key",
    )
    run.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="(default: logging.level of the config)",
    )

    init = command(
        sub,
        "init",
        help="set up a new state directory (key, instance id, empty consent store)",
        description=(
            "Create what a state directory needs: the pseudonymization key (unless"
            " keys.pseudonym_key_file names an existing one, which is used), the instance id"
            " and an empty consent store bound to the key. An initialised directory is checked"
            " and left as it is. Needed once where require_initialized_state is set"
            " (containers); elsewhere the first run does the same."
        ),
    )
    init.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="runtime config (TOML)")
    init.add_argument("--state-dir", type=Path, help="state directory (default: from --config)")
    init.add_argument(
        "--instance-id", metavar="ID", help="this directory's identity (default: generated)"
    )

    keygen = command(
        sub,
        "keygen",
        help="create an operator Ed25519 key pair for signing policies",
        description=(
            "Write KEY (private, mode 0600) and KEY.pub; list KEY.pub in control.trusted_keys. "
            "KEY must lie outside any repository (a directory holding .git, or this "
            "project's source tree): a private key there is one `git add` from being published."
        ),
    )
    keygen.add_argument("key", type=Path, help="private key file to create")
    keygen.add_argument(
        "--allow-in-repo", action="store_true", help="write KEY even inside a repository"
    )

    policy_cmd = command(sub, "policy", help="sign and push policy bundles")
    policy_sub = policy_cmd.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    sign = command(
        policy_sub,
        "sign",
        help="validate and sign a policy: writes POLICY.signed",
        description=(
            "Validate POLICY and sign it with the operator key; the bundle (the policy text "
            "and its signature, nothing secret) goes to --out. Bump the policy's version "
            "first: the gateway accepts only a version newer than every one it has stored. "
            "A signing key inside a repository is refused (move it out, or --allow-in-repo)."
        ),
    )
    sign.add_argument("--key", type=Path, required=True, help="operator private key (from keygen)")
    sign.add_argument("policy", type=Path)
    sign.add_argument("--out", type=Path, help="bundle path (default: POLICY.signed)")
    sign.add_argument(
        "--allow-in-repo", action="store_true", help="use a private key kept inside a repository"
    )
    push = command(policy_sub, "push", help="PUT a signed bundle to a running gateway")
    push.add_argument(
        "--url", required=True, help="control plane base URL, e.g. http://127.0.0.1:8080"
    )
    source = push.add_mutually_exclusive_group()
    source.add_argument(
        "--token-file",
        type=Path,
        help="file holding the operator bearer token (default: $GATEWAY_CONTROL_TOKEN)",
    )
    source.add_argument(
        "--token",
        help="the token itself (discouraged: other users can read a command line;"
        " use --token-file or GATEWAY_CONTROL_TOKEN)",
    )
    push.add_argument("bundle", type=Path)

    audit_cmd = command(sub, "audit", help="audit ledger tools")
    audit_sub = audit_cmd.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = command(
        audit_sub,
        "verify",
        help="check the hash chain; exit 1 if tampered, 3 if the key to check content is missing",
    )
    verify.add_argument(
        "--state-dir", type=Path, help="state directory (default: state_dir of --config)"
    )
    verify.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG),
        help="runtime config",
    )

    rotate = command(
        sub,
        "rotate-key",
        help="replace the pseudonymization key (gateway stopped)",
        description=(
            "Retire the pseudonymization key and create a new one. App pseudonyms, MAC"
            " pseudonyms and seq hashes change (app backends see new users); the store's car"
            " names, seals, audit hashes and grid offsets keep the first key (internal.key)."
            " Retired keys stay in retired-keys/ so erasure events name the refs they made."
        ),
    )
    rotate.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("GATEWAY_CONFIG") or DEFAULT_CONFIG),
        help="runtime config",
    )

    token = command(
        sub,
        "token",
        help="create a bearer token for the control plane",
        description=(
            "Print a new random token and the [[control.tokens]] entry (its hash) for the config."
        ),
    )
    token.add_argument("--name", required=True, help="who holds the token (shown in the audit)")
    token.add_argument("--role", required=True, choices=["operator", "dpo", "viewer"])

    check = command(
        sub,
        "check-policy",
        help="validate a policy and print what it does",
        description=(
            "Validate a policy file; print its features, streams and decisions. Exit 2 if invalid."
        ),
    )
    check.add_argument("policy", type=Path)
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.add_argument(
        "--notice-map",
        nargs="?",
        const=True,
        default=None,
        metavar="FILE",
        help="print which policy entries enforce each section of the privacy notice"
        " (default map: the one shipped with the gateway); exit 1 when a section names"
        " entries that do not exist",
    )

    explain = command(
        sub,
        "explain",
        help="dry-run one message through the policy",
        description=(
            "Decide one message without any broker and print the decision and why. "
            "SETTINGS.json holds the car's privacy screen, e.g. "
            '{"revision": 3, "privacy_mode": false, "location": "approximate", '
            '"features": {"remote_control": true}, "find_my_car_window_open": false}; '
            'use "unknown" for a vehicle that never sent settings. '
            "With --key-file STATE_DIR/pseudonym.key the pseudonyms and approximate "
            "positions are exactly what the gateway on that state directory publishes "
            "for a car whose coarse position is due for a refresh (within the refresh "
            "interval the gateway shows the car's anchored value instead)."
        ),
    )
    explain.add_argument("--policy", type=Path, required=True)
    explain.add_argument("--settings", required=True, help="JSON file, inline JSON, or 'unknown'")
    explain.add_argument(
        "--topic", required=True, help="vehicle-side topic, e.g. vehicle/VIN/tbox/status"
    )
    explain.add_argument(
        "--payload-json", required=True, help="the message as protobuf JSON (file or inline)"
    )
    explain.add_argument(
        "--key-file",
        type=Path,
        help="pseudonymization key, e.g. the production STATE_DIR/pseudonym.key (default: a "
        "random one: pseudonyms and approximate positions then differ from production)",
    )
    explain.add_argument("--vehicle-prefix", default="vehicle", help="vehicle-side topic prefix")
    explain.add_argument("--backend-prefix", default="tsp", help="backend-side topic prefix")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "check-policy":
        return cmd_check_policy(args)
    if args.command == "explain":
        return cmd_explain(args)
    if args.command == "init":
        return cmd_init(args)
    if args.command == "keygen":
        return cmd_keygen(args)
    if args.command == "policy":
        return cmd_policy_sign(args) if args.policy_command == "sign" else cmd_policy_push(args)
    if args.command == "audit":
        return cmd_audit_verify(args)
    if args.command == "token":
        return cmd_token(args)
    if args.command == "rotate-key":
        return cmd_rotate_key(args)
    raise AssertionError(args.command)


# ------------------------------------------------------------ operator tools


def cmd_init(args: argparse.Namespace) -> int:
    from gateway.statedir import StateDirError, init_state

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.state_dir:
        config.state_dir = args.state_dir.resolve()
    if args.instance_id is not None:
        if not re.fullmatch(INSTANCE_ID_PATTERN, args.instance_id):
            print(
                f"error: --instance-id {args.instance_id!r}: must match {INSTANCE_ID_PATTERN}",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        config.instance_id = args.instance_id
    config.require_initialized_state = False  # this is what initialises it
    setup_logging("WARNING")
    try:
        report = init_state(config)
    except (StateDirError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if report.created:
        print(f"initialised {config.state_dir}: created {', '.join(report.created)}")
    else:
        print(f"{config.state_dir} is already initialised: nothing changed")
    print(f"instance id: {report.instance_id}")
    print(f"key:         {report.key_path} (fingerprint {report.fingerprint}); back it up")
    return 0


def _secret_in_repository(path: Path, allowed: bool, what: str) -> str | None:
    """Why a private key may not be at `path` (None when it may)."""
    repository = enclosing_repository(path.parent)
    if repository is None or allowed:
        return None
    return (
        f"{what} {path} is inside the repository {repository}: a private key there is one "
        "`git add` away from being published. Keep it elsewhere (e.g. ~/gateway-ops/, mode "
        "0700), or pass --allow-in-repo if this directory is meant for it"
    )


def cmd_keygen(args: argparse.Namespace) -> int:
    from gateway.control.signing import generate_keypair

    refused = _secret_in_repository(args.key, args.allow_in_repo, "refusing to write the key:")
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_CONFIG
    public = args.key.with_name(args.key.name + ".pub")
    try:
        key_id = generate_keypair(args.key, public)
    except FileExistsError:
        print(f"error: {args.key} exists; refusing to overwrite a key", file=sys.stderr)
        return EXIT_CONFIG
    print(
        f"private key: {args.key} (keep it offline)\npublic key:  {public}\nkey id:      {key_id}"
    )
    print(f'add to the gateway config:  [control] trusted_keys = ["{public}"]')
    return 0


def cmd_policy_sign(args: argparse.Namespace) -> int:
    from gateway.control.signing import BundleError, load_private_key, sign_policy

    refused = _secret_in_repository(args.key, args.allow_in_repo, "refusing to sign: the key")
    if refused:
        print(f"error: {refused}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        text = args.policy.read_text(encoding="utf-8")
        policy = load_policy(args.policy)  # never sign something the gateway would refuse
        bundle = sign_policy(text, load_private_key(args.key))
    except (PolicyError, BundleError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    out = args.out or args.policy.with_name(args.policy.name + ".signed")
    out.write_text(bundle.to_json())
    print(f"signed policy {policy.version} with key {bundle.key_id}: {out}")
    return 0


def cmd_policy_push(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    try:
        token = _push_token(args)
        body = args.bundle.read_bytes()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    request = urllib.request.Request(
        args.url.rstrip("/") + "/v1/policy",
        data=body,
        method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            print(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        print(f"refused ({exc.code}): {exc.read().decode()}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"error: cannot reach {args.url}: {exc.reason}", file=sys.stderr)
        return 1


def _push_token(args: argparse.Namespace) -> str:
    """--token-file, else $GATEWAY_CONTROL_TOKEN, else --token (kept for
    compatibility: a command line is visible to other users)."""
    if args.token_file is not None:
        return read_secret(args.token_file, "--token-file")
    if args.token:
        return str(args.token)
    token = os.environ.get(CONTROL_TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"no token: give --token-file FILE or set {CONTROL_TOKEN_ENV}")
    return token


def cmd_rotate_key(args: argparse.Namespace) -> int:
    from gateway.statedir import StateDirError, rotate_key

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        rotation = rotate_key(config, time.time())
    except (StateDirError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"new key {config.key_path} (fingerprint {rotation.new_fingerprint}): back it up")
    print(f"retired {rotation.retired} (fingerprint {rotation.retired_fingerprint})")
    if rotation.internal_created:
        print(
            f"internal key {config.state_dir / 'internal.key'} written (the first key): back it"
            " up; it keeps the store's car names, seals and grid offsets"
        )
    print(
        "delete the retired key once the longest retention of pseudonymized streams has"
        " passed: until then erasure events also name the refs it made"
    )
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from gateway.statedir import INTERNAL_KEY_FILE
    from gateway.store import SqliteConsentStore, StoreError
    from gateway.store.postgres import PostgresConsentStore

    state_dir = args.state_dir
    if state_dir is None and is_packaged_default(args.config):
        print(f"error: {_NO_STATE_DIR}", file=sys.stderr)
        return EXIT_CONFIG
    store_url = None  # with --state-dir: that directory's SQLite store
    if state_dir is None:
        try:
            loaded = load_config(args.config)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        state_dir, store_url = loaded.state_dir, loaded.store.url
    db = Path(state_dir) / SqliteConsentStore.FILENAME
    if store_url is None and not db.exists():
        print(f"error: no consent store at {db}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        # Reading only: the ledger of a running gateway's database verifies too.
        store = SqliteConsentStore(db) if store_url is None else PostgresConsentStore(store_url)
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # Content hashes are keyed with the internal key (the first key, once the
    # key was rotated): without it only the chain can be checked.
    key_file = Path(state_dir) / INTERNAL_KEY_FILE
    if not key_file.exists():
        key_file = Path(state_dir) / KeysConfig().pseudonym_key_file
    try:
        with contextlib.suppress(FileNotFoundError, KeyFileError):
            store.use_key_for_verification(read_key(key_file))
        result = store.verify_audit()
    finally:
        store.close()
    if result.ok and result.unchecked:
        print(
            f"audit ledger chain intact ({result.entries} entries, head {result.head}), but the"
            f" content of {result.unchecked} entries was NOT checked: no readable key at"
            f" {key_file}",
            file=sys.stderr,
        )
        return EXIT_UNCHECKED
    if result.ok:
        print(f"audit ledger intact: {result.entries} entries, head {result.head}")
        if result.redacted:
            print(f"  {result.redacted} entries had the VIN removed by the schema-8 upgrade")
        return 0
    print(f"audit ledger TAMPERED ({len(result.problems)} problems):", file=sys.stderr)
    for problem in result.problems:
        print(f"  {problem}", file=sys.stderr)
    return 1


def cmd_token(args: argparse.Namespace) -> int:
    from gateway.control.api import hash_token

    value = secrets.token_urlsafe(32)
    while value.startswith("-"):  # `--token -abc...` would read as an option
        value = secrets.token_urlsafe(32)
    print(f"token (give to {args.name}, shown once): {value}")
    print("config entry:")
    print(f'[[control.tokens]]\nname = "{args.name}"\nrole = "{args.role}"')
    print(f'sha256 = "{hash_token(value)}"')
    return 0


# ---------------------------------------------------------------------- run


# flag -> (its config key, how its value goes there)
RUN_FLAGS: dict[str, tuple[tuple[str, ...], Callable[[Any], Any]]] = {
    "vehicle_broker": (("vehicle_broker", "url"), str),
    "backend_broker": (("backend_broker", "url"), str),
    "state_dir": (("state_dir",), lambda p: Path(p).resolve()),
    "policy": (("policy",), lambda p: Path(p).resolve()),
    "instance_id": (("instance_id",), str),
    "control_listen": (("control", "listen"), str),
    "json_logs": (("logging", "json"), bool),
    "log_level": (("logging", "level"), str),
}


_NO_STATE_DIR = (
    "the default config installed with the package names no state directory: "
    "give --state-dir DIR (or --config with a state_dir of your own)"
)


def resolve_run_config(args: argparse.Namespace) -> GatewayConfig:
    """Flags > GATEWAY_* environment > config file > defaults."""
    if args.state_dir is None and is_packaged_default(args.config):
        # Its relative state_dir would land inside the installed package.
        raise ConfigError(_NO_STATE_DIR)
    overrides: dict[str, Any] = {}
    flags: dict[tuple[str, ...], str] = {}
    for dest, (key, convert) in RUN_FLAGS.items():
        value = getattr(args, dest)
        if value is None or value is False or (value == "" and dest != "control_listen"):
            continue
        section = overrides
        for part in key[:-1]:
            section = section.setdefault(part, {})
        section[key[-1]] = convert(value)
        flags[key] = "--" + dest.replace("_", "-")
    return load_config(args.config, overrides, flags)


def _json_logs_wanted(args: argparse.Namespace) -> bool:
    """Whether a refusal before the configuration is complete should be a
    JSON line: the flag, the environment, or the file (if it can be read)."""
    if getattr(args, "json_logs", False):
        return True
    for name, value in os.environ.items():
        if name.upper() == f"{ENV_PREFIX}LOGGING__JSON":
            return value.strip().lower() in ("1", "true", "yes", "on")
    try:
        logging_section = read_config_file(args.config).get("logging", {})
    except ConfigError:
        return False
    return isinstance(logging_section, dict) and logging_section.get("json") is True


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.statedir import StateDirError, open_state

    try:
        config = resolve_run_config(args)
    except ConfigError as exc:
        setup_logging("INFO", _json_logs_wanted(args))
        log.error("refusing to start: %s", exc)
        return EXIT_CONFIG
    setup_logging(config.logging.level, config.logging.json_lines)
    try:
        # Secrets, certificates and keys readable: before any state is touched.
        config.broker_access()
        config.control.all_tokens()
    except ConfigError as exc:
        log.error("refusing to start: %s", exc)
        return EXIT_CONFIG
    try:
        policy = load_policy(config.policy)
        problems = check_egress(
            policy, config.vehicle_broker.topic_prefix, config.backend_broker.topic_prefix
        )
        if problems:
            raise PolicyError(str(config.policy), problems)
        state = open_state(config)  # held (locked) until the process ends
    except (PolicyError, StateDirError, OSError) as exc:
        log.error("refusing to start: %s", exc)
        return EXIT_CONFIG
    config.instance_id = state.instance_id
    clock: Clock = time.time
    if args.simulated_clock is not None:
        try:
            clock = SimulatedClock(args.simulated_clock)
        except ClockFileError as exc:
            log.error("refusing to start: --simulated-clock %s", exc)
            state.state_dir.unlock()
            return EXIT_CONFIG
        log.warning(
            "SIMULATED CLOCK from %s: every time-based rule runs on simulated time"
            " (testing only, never in production)",
            args.simulated_clock,
        )
    try:
        return _run(config, policy, state, lambda: resolve_run_config(args), clock)
    finally:
        state.state_dir.unlock()


# What SIGHUP applies; any other change waits for a restart (and is named).
RELOADABLE = (
    "instance_id",  # from the state directory
    "policy",  # offered, never applied by a reload
    "logging.level",
    "control.tokens",
    "control.tokens_file",
    "control.trusted_keys",
    *(
        f"{side}.{key}"
        for side in ("vehicle_broker", "backend_broker")
        for key in (
            "tls_ca_file",
            "tls_cert_file",
            "tls_key_file",
            "tls_key_password_file",
            "tls_min_version",
            "tls_server_name",
            "password_file",
        )
    ),
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else key))
    return flat


def restart_needed(running: GatewayConfig, new: GatewayConfig) -> list[str]:
    """Keys whose change a reload does not apply (e.g. broker urls, limits)."""
    old_keys = _flatten(running.model_dump(mode="json"))
    new_keys = _flatten(new.model_dump(mode="json"))
    return sorted(
        key
        for key in old_keys.keys() | new_keys.keys()
        if old_keys.get(key) != new_keys.get(key)
        and not any(key == r or key.startswith(r + ".") for r in RELOADABLE)
    )


async def reload_config(
    load: Callable[[], GatewayConfig],
    running: GatewayConfig,
    service: GatewayService,
    control: ControlPlane,
) -> bool:
    """SIGHUP: read the configuration again (flags, environment, file) and
    apply control tokens, trusted keys, the log level, and broker TLS material
    and passwords (used from the next reconnect: connections in place are
    kept). All or nothing: a configuration that does not load changes nothing.
    A newer policy file is offered, not applied."""
    from gateway.control.api import load_trusted_keys
    from gateway.control.signing import BundleError

    log.info("SIGHUP: reloading the configuration")
    try:
        new = load()
        access = new.broker_access()
        tokens = new.control.all_tokens()
        trusted = load_trusted_keys(new.control.trusted_keys)
    except (ConfigError, BundleError, OSError, ValueError) as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return False
    service.reload_brokers(access)
    control.reload(tokens, trusted)
    logging.getLogger().setLevel(new.logging.level)
    log.info(
        "configuration reloaded: log level %s, %d token(s), %d trusted key(s); broker TLS"
        " material and passwords apply from the next reconnect",
        new.logging.level,
        len(tokens),
        len(trusted),
    )
    pending = restart_needed(running, new)
    if pending:
        log.warning(
            "changed but applied only by a restart: %s", ", ".join(pending), extra={"keys": pending}
        )
    try:
        offered = load_policy(new.policy)
    except PolicyError as exc:
        log.warning("policy file %s is not offered: %s", new.policy, exc)
    else:
        service.offer_policy(offered, str(new.policy))
    return True


# CPython collects its youngest generation every 700 container objects
# allocated and not yet freed. The messages in flight alone hold more than
# that (about a dozen tracked objects each, a window of hundreds), so the
# default threshold had the collector traverse the same in-flight messages
# every few hundred messages, promote them, and run a full collection over
# every loaded car every few thousand: a quarter of the gateway's CPU on the
# all-forward benchmark (docs/performance.md). The threshold stays above
# what a full window holds (GC_YOUNG_PER_INFLIGHT tracked objects per
# message in flight, with margin). All it delays is the freeing of
# reference cycles: objects freed by their reference count, nearly all of
# them, go at once, and the message path leaves none (counted: no cycle
# left behind by thousands of forwarded, dropped, malformed and settings
# messages).
GC_YOUNG_THRESHOLD = 50_000
GC_YOUNG_PER_INFLIGHT = 25


def tune_garbage_collector(inflight: int = 0) -> None:
    """Once the state is loaded: freeze it (the loaded cars, the policy, the
    modules) out of every later collection, which then traverses only what was
    allocated since, and raise the young threshold (see GC_YOUNG_THRESHOLD)
    for `inflight` messages in flight."""
    gc.freeze()
    young = max(GC_YOUNG_THRESHOLD, GC_YOUNG_PER_INFLIGHT * inflight)
    gc.set_threshold(young, *gc.get_threshold()[1:])
    gc.enable()


@contextlib.contextmanager
def collection_paused_while_loading(inflight: int) -> Iterator[None]:
    """No collection while the state loads: a fleet is millions of objects
    that live as long as the process, and collections during the load would
    traverse them again and again (seconds at a million cars). Tuned and on
    again afterwards, also when the start fails."""
    gc.disable()
    try:
        yield
    finally:
        tune_garbage_collector(inflight)


def _run(
    config: GatewayConfig,
    policy: CompiledPolicy,
    state: OpenState,
    load: Callable[[], GatewayConfig],
    clock: Clock = time.time,
) -> int:
    from gateway.control.signing import BundleError
    from gateway.service import GatewayService

    async def serve() -> None:
        from gateway.control.api import ControlPlane

        try:
            service = GatewayService(
                config,
                policy,
                state.key,
                state.store,
                clock=clock,
                internal_key=state.internal_key,
                retired_keys=state.retired_keys,
            )
        except ConfigError as exc:
            log.error("refusing to start: %s", exc)
            raise SystemExit(EXIT_CONFIG) from exc
        try:
            control = ControlPlane(service, config.control)
        except (OSError, ValueError, ConfigError, BundleError) as exc:
            log.error("refusing to start: control plane: %s", exc)
            raise SystemExit(EXIT_CONFIG) from exc
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        reloading = asyncio.Lock()

        async def reload() -> None:
            async with reloading:  # one at a time, in the order received
                await reload_config(load, config, service, control)

        loop.add_signal_handler(signal.SIGHUP, lambda: service.spawn(reload()))
        log.info(
            "starting: vehicle broker %s as %s, backend broker %s as %s, state %s",
            config.vehicle_broker.endpoint.redacted(),
            config.client_id(config.vehicle_broker),
            config.backend_broker.endpoint.redacted(),
            config.client_id(config.backend_broker),
            config.state_dir,
            extra={"version": __version__},
        )
        with collection_paused_while_loading(config.pipeline.inflight):
            try:
                await service.start()  # runs the last accepted policy (stored), if any
            except PolicyError as exc:
                log.error(
                    "refusing to start: the last accepted policy no longer validates: %s", exc
                )
                raise SystemExit(EXIT_CONFIG) from exc
        try:
            await control.start()
        except OSError as exc:
            log.error("control plane cannot listen on %s: %s", config.control.listen, exc)
            await service.stop()
            raise SystemExit(EXIT_CONFIG) from exc
        service.offer_policy(policy, str(config.policy))
        await stop.wait()
        log.info("shutting down")
        await control.stop()
        await service.stop()

    asyncio.run(serve())
    return 0


# ------------------------------------------------------------- check-policy


def cmd_check_policy(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.notice_map is not None:
        return _print_notice_map(policy, args.notice_map)
    rows = summary_rows(policy)
    if args.json:
        print(
            json.dumps(
                {"version": policy.version, "digest": policy.digest, "streams": rows}, indent=2
            )
        )
        return 0
    from rich.console import Console

    print_policy_summary(Console(), policy, rows)  # as wide as the terminal ($COLUMNS)
    return 0


def _print_notice_map(policy: CompiledPolicy, path: bool | Path) -> int:
    import yaml
    from rich.console import Console
    from rich.table import Table

    from gateway.control.api import ROUTES
    from gateway.notice import DEFAULT_NOTICE_MAP, check, load_notice_map

    source = DEFAULT_NOTICE_MAP if path is True else Path(str(path))
    try:
        sections = load_notice_map(source)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        print(f"error: notice map {source}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    table = Table(title=f"the notice, section by section, against policy {policy.version}")
    for column in ("section", "lines", "what the notice says", "enforced by", "where it differs"):
        table.add_column(column)
    for section in sections:
        table.add_row(
            section.id,
            section.lines,
            section.title,
            "\n".join(section.policy) or f"(outside the gateway: {section.outside})",
            section.differs,
        )
    Console().print(table)
    problems = check(sections, policy, {route.path for route in ROUTES})
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


WIDE_TABLE = 150  # columns from which streams and decisions fit in one table
_DECISION_COLUMNS = [
    ("unknown car or privacy mode", "unknown_or_privacy_mode"),
    ("feature off", "feature_off"),
    ("location off", "location_off"),
    ("approximate", "approximate"),
    ("precise", "precise"),
]


def _narrow_streams_table(rows: list[dict[str, Any]], style: Any) -> Any:
    """Streams and decisions for a narrow terminal: one section per stream, one line per
    privacy state (states with the same outcome share a line)."""
    from rich.table import Table

    table = Table(title="streams and decisions", box=style, show_lines=False)
    table.add_column("stream / privacy state", no_wrap=True)
    table.add_column("what the gateway does")
    for n, row in enumerate(rows):
        table.add_row(
            f"[bold]{row['stream']}[/]",
            f"{row['message']}, feature {row['feature']} ({row['legal_basis']}), "
            f"kept {row['retention_days']} day{'' if row['retention_days'] == 1 else 's'}",
        )
        groups: list[tuple[list[str], str]] = []
        for heading, key in _DECISION_COLUMNS:
            outcome = str(row[key])
            if groups and groups[-1][1] == outcome:
                groups[-1][0].append(heading)
            else:
                groups.append(([heading], outcome))
        for i, (headings, outcome) in enumerate(groups):
            label = "any state" if len(headings) == len(_DECISION_COLUMNS) else ", ".join(headings)
            last = i == len(groups) - 1 and n < len(rows) - 1
            table.add_row(f"  {label}", outcome, end_section=last)
    return table


def _route_words(route: CompiledRoute) -> str:
    words = [f"without {', '.join(route.remove_fields)}"] if route.remove_fields else []
    words += ["pseudonym"] if route.pseudonymize_vin else []
    return f" ({'; '.join(words)})" if words else ""


def print_policy_summary(console: Any, policy: CompiledPolicy, rows: list[dict[str, Any]]) -> None:
    from rich import box
    from rich.table import Table

    narrow = console.width < WIDE_TABLE
    style = box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD
    console.print(f"[bold]policy {policy.version}[/] (sha256 {policy.digest[:16]}…) is valid")
    console.print(
        f"approximate location: {policy.cell_size_m:g} m cells, refresh at most every "
        f"{policy.refresh_interval_ms / 1000:g} s; find-my-car window {policy.window_s:g} s"
    )
    features = Table(title="features", box=style)
    for col in ("feature", "legal basis", "default", "per app", "description"):
        features.add_column(col, no_wrap=col != "description")
    for name, spec in policy.features.items():
        features.add_row(
            name,
            spec.legal_basis,
            "on" if spec.default else "off",
            "yes" if spec.per_app else "",
            spec.description,
        )
    console.print(features)
    recipients = Table(title="recipients and transfers", box=style)
    headings = ("role", "region", "transfer basis", "prefix", "streams")
    recipients.add_column("recipient", no_wrap=True)
    if narrow:  # one column of text: nothing cut short
        recipients.add_column("; ".join(headings))
    else:
        for col in headings:
            recipients.add_column(col, no_wrap=col != "streams")
    for rid, recipient in declared_recipients(policy.document).items():
        routed = [
            stream.key + _route_words(route)
            for stream in policy.streams
            for route in stream.routes
            if route.recipient == rid
        ]
        cells = [
            recipient.role
            if recipient.role == "controller"
            else f"processor for {recipient.controller}",
            recipient.region or "-",
            recipient.transfer_basis,
            recipient.egress_prefix or "(backend prefix)",
            ", ".join(routed),
        ]
        recipients.add_row(rid, *(["; ".join(cells)] if narrow else cells))
    console.print(recipients)
    if narrow:
        console.print(_narrow_streams_table(rows, style))
    else:
        columns = [
            ("stream", "stream"),
            ("message", "message"),
            ("feature", "feature"),
            ("legal basis", "legal_basis"),
            ("days kept", "retention_days"),
            *_DECISION_COLUMNS,
        ]
        streams = Table(title="streams and decisions", box=style)
        for heading, key in columns:
            streams.add_column(heading, justify="right" if key == "retention_days" else "left")
        for row in rows:
            streams.add_row(*(str(row[key]) for _, key in columns))
        console.print(streams)
    commands = Table(title="commands", box=style)
    for col in ("command", "needs feature", "opens find-my-car window"):
        commands.add_column(col)
    for cmd in policy.commands.values():
        commands.add_row(cmd.name, cmd.feature, "yes" if cmd.opens_window else "")
    console.print(commands)


# ------------------------------------------------------------------ explain


def _json_arg(value: str) -> Any:
    text = value
    if not value.lstrip().startswith(("{", "[", '"')) and Path(value).exists():
        text = Path(value).read_text()
    return json.loads(text)


def _explain_state(policy: CompiledPolicy, vin: str, raw: Any) -> VehicleState | None:
    if raw == "unknown" or raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("settings must be a JSON object or 'unknown'")
    location = raw.get("location", "off")
    if isinstance(location, bool) or not isinstance(location, str | int):
        raise ValueError(f"location must be a mode name or number, not {location!r}")
    snapshot = SettingsSnapshot(
        vin=vin,
        revision=int(raw.get("revision", 1)),
        privacy_mode=bool(raw.get("privacy_mode", False)),
        location=LocationMode.parse(location),
        features={str(k): bool(v) for k, v in raw.get("features", {}).items()},
        applied_at=0.0,
        policy_version=policy.version,
    )
    window = 1.0 if raw.get("find_my_car_window_open") else 0.0
    return state_from_snapshot(policy, snapshot, window_until=window)


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    key_note = "random key (pseudonyms differ from production)"
    key = secrets.token_bytes(32)
    if args.key_file:
        try:
            key, key_note = read_key(args.key_file), f"key from {args.key_file}"
        except OSError as exc:  # a usage error, not a traceback
            print(f"error: {args.key_file}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_CONFIG
        except KeyFileError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    ctx = DecisionContext(policy, key, args.vehicle_prefix, args.backend_prefix)
    parts = split_vehicle_topic(args.vehicle_prefix, args.topic)
    if parts is None:
        print(f"error: topic must start with {args.vehicle_prefix}/{{vin}}/", file=sys.stderr)
        return EXIT_CONFIG
    vin, relative = parts
    try:
        settings_raw = args.settings if args.settings == "unknown" else _json_arg(args.settings)
        state = _explain_state(policy, vin, settings_raw)
        payload_obj = _json_arg(args.payload_json)
    except (ValueError, KeyError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if relative == SETTINGS_TOPIC:
        message_cls: Any = privacy_pb2.PrivacySettings
    else:
        route = policy.route(relative)
        if route is None:
            report = {
                "decision": "drop",
                "reason": "unknown_topic",
                "why": "no stream of the policy matches this topic (default deny)",
            }
            print(json.dumps(report, indent=2))
            return 0
        message_cls = route[0].message_cls
    try:
        message = json_format.ParseDict(payload_obj, message_cls())
    except json_format.ParseError as exc:
        print(f"error: payload does not fit {message_cls.DESCRIPTOR.name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    states = {vin: state} if state is not None else {}
    decision = decide(ctx, args.topic, message.SerializeToString(), states, {}, now=0.5)
    print(json.dumps(explain_decision(decision, message_cls, state, key_note), indent=2))
    return 0


_WHY = {
    "unknown_topic": "no stream of the policy matches this topic (default deny)",
    "invalid_vin": "the topic's VIN is not a valid 17-character VIN",
    "undecodable": "the payload is not a valid message of the stream's type",
    "vin_mismatch": "header.vin differs from the VIN in the topic (spoofing)",
    "unknown_vehicle": (
        "no privacy settings received from this vehicle: only legal-obligation streams pass"
    ),
    "privacy_mode": "privacy mode is on: only legal-obligation streams pass",
    "feature_disabled": "the driver switched this stream's feature off",
    "objected": "the data subject objected to this feature (Art. 21), whatever the toggle",
    "consent_outdated": (
        "the policy widened this stream since the car's consent was given: the car is asked again"
    ),
    "location_off": "location is off and this stream's purpose is location",
    "no_find_my_car_window": "tbox/location passes only inside a find-my-car window",
    "unanswered_location": (
        "the location answers no open find-my-car command (its request_id matches none)"
    ),
    "find_my_car_fixes_spent": (
        "the find-my-car command this location answers already got its fixes"
    ),
    "stale_revision": "settings revision not newer than the applied one",
    "vin_in_pseudonymized_payload": "the VIN appears in bytes of a pseudonymized stream",
    "captured_before_known_settings": (
        "captured before the oldest settings the gateway knows for this vehicle"
    ),
    "settings_pending": "the settings revision it was captured under never arrived in time",
    "parked_evicted": "parked for its settings revision, pushed out by the byte bounds",
}


def explain_decision(
    decision: Forward | Drop | ApplySettings | Hold,
    message_cls: Any,
    state: VehicleState | None,
    key_note: str,
) -> dict[str, Any]:
    vehicle = (
        "unknown vehicle"
        if state is None
        else {
            "revision": state.revision,
            "privacy_mode": state.privacy_mode,
            "location": state.location.name,
            "enabled_features": sorted(state.enabled),
        }
    )
    if isinstance(decision, Drop):
        return {
            "decision": "drop",
            "reason": decision.reason.value,
            "why": _WHY.get(decision.reason.value, ""),
            "detail": decision.detail,
            "stream": decision.stream,
            "vehicle": vehicle,
            "published": "nothing",
        }
    if isinstance(decision, Hold):
        return {
            "decision": "hold",
            "why": "captured under a settings revision not applied yet: parked until it is",
            "revision": decision.revision,
            "stream": decision.stream,
            "vehicle": vehicle,
            "published": "nothing (yet)",
        }
    if isinstance(decision, ApplySettings):
        return {
            "decision": "apply_settings",
            "vehicle_after": {
                "revision": decision.state.revision,
                "privacy_mode": decision.state.privacy_mode,
                "location": decision.state.location.name,
                "enabled_features": sorted(decision.state.enabled),
            },
            "publishes": decision.applied_topic,
        }
    out = message_cls.FromString(decision.payload)
    return {
        "decision": "forward",
        "topic": decision.topic,
        "stream": decision.stream,
        "feature": decision.feature,
        "user_properties": dict(decision.user_properties),
        "transforms": list(decision.transforms),
        "payload": json_format.MessageToDict(out, preserving_proto_field_name=True),
        "vehicle": vehicle,
        "key": key_note,
    }
