"""What `check-config` tells an operator: every problem of a configuration in one run, where
each came from (a line of the file or an environment variable), warnings about accounts and
callers that only the environment defines, and hints for the common mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.cli import main
from service.config import ConfigError, check_config, load_settings
from service.keys import new_api_key
from tests.config_files import write_text

PASSWORD = "pw-Secret-0451"
ENV_PASSWORD = "pw-Secret-9876"
REDIS_PASSWORD = "redis-Secret-1234"
DIGEST = "ab" * 32
OTHER_DIGEST = "cd" * 32

# Line numbers matter below: they are what the report names.
CONFIG = f"""\
redis_url: "memory://"
upstream:
  dialect: legacy
  timeout_seconds: 10
accounts:
  fleet-eu:
    username: ops@example.com
    password_file: {{password_file}}
callers:
  billing:
    api_key_sha256: "sha256:{DIGEST}"
    accounts:
      - fleet-eu
"""


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet-eu-password"
    path.write_text(PASSWORD + "\n", encoding="utf-8")
    return path


def config_file(tmp_path: Path, password_file: Path, *replace: tuple[str, str]) -> Path:
    """CONFIG, with each (old, new) of `replace` applied to its text."""
    text = CONFIG.format(password_file=password_file)
    for old, new in replace:
        assert old in text
        text = text.replace(old, new)
    return write_text(tmp_path, text)


def report(path: Path) -> tuple[list[str], list[str]]:
    """The problem lines check-config prints (with their sources), and its warnings."""
    with pytest.raises(ConfigError) as caught:
        check_config(path)
    return caught.value.report, caught.value.warnings


def check_config_output(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["check-config", "--config", str(path)])
    return code, capsys.readouterr().out.splitlines()


# --- every problem in one run -----------------------------------------------------------------


def test_field_and_cross_field_problems_are_reported_together(
    tmp_path: Path, password_file: Path
) -> None:
    """A caller naming an unknown account is reported in the same run as an invalid field,
    and so is a real Redis without encryption keys."""
    path = config_file(
        tmp_path,
        password_file,
        ('redis_url: "memory://"', 'redis_url: "redis://redis:6379/0"'),
        ("timeout_seconds: 10", "timeout_seconds: 0"),
        ("      - fleet-eu", "      - fleet-eu\n      - fleet-us"),
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [
        "upstream.timeout_seconds: must be greater than 0",
        "callers.billing.accounts[1]: unknown account 'fleet-us'",
        "encryption_keys_file: required when redis_url is a real Redis (replicas must share "
        "keys); create one with `monogoto-broker new-encryption-key > FILE`",
    ]


def test_checks_within_an_entry_run_next_to_its_field_problems(tmp_path: Path) -> None:
    """An account's password file and a caller's digest are checked even when other fields of
    the same entry are invalid; a caller sharing a key is found while another caller is
    invalid."""
    text = f"""\
redis_url: "memory://"
accounts:
  fleet-eu:
    username: ""
    password_file: /no/such/file
callers:
  billing:
    api_key_sha256: "sha256:{DIGEST}"
    accounts: "fleet-eu"
  ops:
    api_key_sha256: "sha256:{DIGEST}"
    accounts: ["*"]
    timeout_seconds: 3
  audit:
    api_key_sha256: "sha256:nope"
    accounts: ["fleet-eu", "fleet-ap"]
"""
    with pytest.raises(ConfigError) as caught:
        load_settings(write_text(tmp_path, text))
    assert caught.value.problems == [
        "accounts.fleet-eu.username: must not be empty",
        "accounts.fleet-eu.password_file: cannot read /no/such/file (No such file or directory)",
        "callers.billing.accounts: must be a list",
        "callers.ops.timeout_seconds: unknown key",
        "callers.audit.api_key_sha256: must be 'sha256:' and 64 hex digits (see new-api-key)",
        "callers.ops.api_key_sha256: same key as caller 'billing' (each caller needs its own)",
        "callers.audit.accounts[1]: unknown account 'fleet-ap'",
    ]


def test_a_check_needing_an_invalid_field_is_left_out(tmp_path: Path, password_file: Path) -> None:
    """Where a check cannot run, it says nothing rather than something wrong: no "required"
    for a password given in the wrong form, no encryption-key problem for an invalid
    redis_url."""
    path = config_file(
        tmp_path,
        password_file,
        ('redis_url: "memory://"', 'redis_url: "http://db"'),
        (f"password_file: {password_file}", "password: [1, 2]"),
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [
        "redis_url: must be a redis://, rediss://, unix://, memory://, redis+sentinel:// or "
        "redis+cluster:// URL (rediss+sentinel:// and rediss+cluster:// for TLS)",
        "accounts.fleet-eu.password: must be a string",
    ]


# --- where each problem came from -------------------------------------------------------------


def test_problems_name_the_file_line_or_the_variable(
    tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A problem in the file names its line (of the key, or of the list item); one in a
    variable names the variable, even below a known section."""
    monkeypatch.setenv("BROKER_UPSTREAM__TIMEOUT", "3")
    monkeypatch.setenv("BROKER_REFRESH__FRACTION", "1.5")
    path = config_file(
        tmp_path,
        password_file,
        ("dialect: legacy", "dialect: v2"),
        ("      - fleet-eu", "      - fleet-eu\n      - fleet-us"),
    )
    assert report(path) == (
        [
            f"upstream.dialect: must be 'legacy' or 'v1' (from {path} line 3)",
            "upstream.timeout: unknown key (from BROKER_UPSTREAM__TIMEOUT)",
            "refresh.fraction: must be less than 1 (from BROKER_REFRESH__FRACTION)",
            f"callers.billing.accounts[1]: unknown account 'fleet-us' (from {path} line 14)",
        ],
        [],
    )


def test_a_missing_field_names_the_entry_that_lacks_it(tmp_path: Path) -> None:
    """A required field that is absent is reported at the line of its account."""
    path = write_text(tmp_path, 'redis_url: "memory://"\naccounts:\n  fleet-eu:\n    password: x\n')
    assert report(path)[0] == [f"accounts.fleet-eu.username: required (from {path} line 3)"]


def test_the_file_is_named_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A relative --config path is named as it was given."""
    write_text(tmp_path, 'redis_url: "memory://"\nkey_prefix: ""\naccounts: {}\n')
    monkeypatch.chdir(tmp_path)
    assert check_config_output(Path("config.yaml"), capsys) == (
        2,
        [
            "key_prefix: must be non-empty, without whitespace, '{' or '}' "
            "(from config.yaml line 2)",
            "accounts: at least one account is required (from config.yaml line 3)",
        ],
    )


def test_a_whole_section_given_as_json_names_its_variable(
    tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A section given as JSON is merged into the file's, and its problems name it."""
    monkeypatch.setenv("BROKER_UPSTREAM", '{"timeout_seconds": -1}')
    path = config_file(tmp_path, password_file, ("dialect: legacy", "dialect: v1"))
    assert report(path)[0] == [
        "upstream.timeout_seconds: must be greater than 0 (from BROKER_UPSTREAM)"
    ]
    monkeypatch.setenv("BROKER_UPSTREAM", '{"timeout_seconds": 2}')
    settings = check_config(path).settings
    assert (settings.upstream.dialect, settings.upstream.timeout_seconds) == ("v1", 2)


def test_a_variable_that_is_not_json_is_named_and_the_rest_still_checked(
    tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A list that is not JSON names its variable; the other problems are reported too."""
    monkeypatch.setenv("BROKER_CALLERS__BILLING__ACCOUNTS", "fleet-eu")
    path = config_file(tmp_path, password_file, ("timeout_seconds: 10", "timeout_seconds: 0"))
    assert report(path)[0] == [
        "BROKER_CALLERS__BILLING__ACCOUNTS: a list or mapping given in an environment variable "
        """must be JSON, e.g. '["fleet-eu"]'""",
        f"upstream.timeout_seconds: must be greater than 0 (from {path} line 4)",
    ]


# --- account and caller names in variables ----------------------------------------------------


def test_underscore_in_a_variable_stands_for_the_files_dash(
    tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKER_ACCOUNTS__FLEET_EU__* applies to the file's account fleet-eu (a shell cannot
    export a name holding '-'), and so do caller variables; no account fleet_eu appears."""
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_EU__TIMEOUT_SECONDS", "4")
    monkeypatch.setenv("BROKER_CALLERS__FLEET_INGEST__ACCOUNTS", '["*"]')
    path = config_file(tmp_path, password_file, ("  billing:", "  fleet-ingest:"))
    checked = check_config(path)
    assert set(checked.settings.accounts) == {"fleet-eu"}
    assert checked.settings.account("fleet-eu").timeout_seconds == 4
    assert checked.settings.callers["fleet-ingest"].accounts == ["*"]
    assert checked.warnings == []


def test_an_exact_name_wins_and_an_ambiguous_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A variable applies to the account it spells exactly; when several accounts read the
    same once '-' is read as '_', a variable naming none exactly is refused."""
    text = """\
redis_url: "memory://"
accounts:
  a-b_c: {username: one, password: x}
  a_b-c: {username: two, password: y}
  a_b_c: {username: three, password: z}
"""
    path = write_text(tmp_path, text)
    monkeypatch.setenv("BROKER_ACCOUNTS__A_B_C__USERNAME", "exact")
    assert check_config(path).settings.accounts["a_b_c"].username == "exact"
    path.write_text(text.replace("  a_b_c: {username: three, password: z}\n", ""))
    assert report(path)[0] == [
        "BROKER_ACCOUNTS__A_B_C__USERNAME: matches both accounts a-b_c and a_b-c of "
        f"{path} once '-' is read as '_'; spell the name exactly (with its '-') or rename one"
    ]


def test_a_variable_creating_an_account_is_a_warning(
    tmp_path: Path,
    password_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An account that only variables define is allowed, with a warning naming them and, for
    a name with '_', why it cannot be a name with '-'; check-config still succeeds."""
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_US__USERNAME", "us@example.com")
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_US__PASSWORD", ENV_PASSWORD)
    monkeypatch.setenv("BROKER_CALLERS__OPS", f'{{"api_key_sha256": "{OTHER_DIGEST}"}}')
    monkeypatch.setenv("BROKER_CALLERS__OPS__ACCOUNTS", '["fleet_us"]')
    path = config_file(tmp_path, password_file)
    assert check_config_output(path, capsys) == (
        0,
        [
            "warning: accounts.fleet_us: created by BROKER_ACCOUNTS__FLEET_US__PASSWORD, "
            f"BROKER_ACCOUNTS__FLEET_US__USERNAME, not in {path} (environment variables "
            "cannot spell '-': accounts named with '-' must be in the file, and then '_' in a "
            "variable stands for their '-')",
            f"warning: callers.ops: created by BROKER_CALLERS__OPS, "
            f"BROKER_CALLERS__OPS__ACCOUNTS, not in {path}",
            f"{path}: OK (2 accounts, 2 callers)",
        ],
    )


def test_an_incomplete_account_from_variables_is_named_by_them(
    tmp_path: Path,
    password_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A password alone creates an account without a username: the warning and the problem
    both name the variable."""
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_US__PASSWORD", ENV_PASSWORD)
    path = config_file(tmp_path, password_file)
    assert check_config_output(path, capsys) == (
        2,
        [
            "warning: accounts.fleet_us: created by BROKER_ACCOUNTS__FLEET_US__PASSWORD, not in "
            f"{path} (environment variables cannot spell '-': accounts named with '-' must be "
            "in the file, and then '_' in a variable stands for their '-')",
            "accounts.fleet_us.username: required (from BROKER_ACCOUNTS__FLEET_US__PASSWORD)",
        ],
    )


# --- secrets in variables and in files --------------------------------------------------------


def test_a_variable_replaces_a_secret_the_file_reads_from_a_file(
    tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BROKER_ACCOUNTS__FLEET_EU__PASSWORD wins over the file's password_file (which is then
    not read at all), and a variable's *_file over the file's inline secret."""
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_EU__PASSWORD", ENV_PASSWORD)
    path = config_file(tmp_path, password_file)
    password_file.unlink()
    account = check_config(path).settings.account("fleet-eu")
    assert account.password.get_secret_value() == ENV_PASSWORD

    monkeypatch.delenv("BROKER_ACCOUNTS__FLEET_EU__PASSWORD")
    digests = tmp_path / "digests"
    digests.write_text(f"sha256:{OTHER_DIGEST}\n", encoding="utf-8")
    monkeypatch.setenv("BROKER_CALLERS__BILLING__API_KEY_SHA256_FILE", str(digests))
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_EU__PASSWORD_FILE", str(digests))
    monkeypatch.setenv("BROKER_REDIS_URL_FILE", str(tmp_path / "no-url"))
    path = config_file(tmp_path, password_file, (f"password_file: {password_file}", "password: x"))
    assert report(path)[0] == [
        f"redis_url_file: cannot read {tmp_path / 'no-url'} (No such file or directory) "
        "(from BROKER_REDIS_URL_FILE)"
    ]
    monkeypatch.delenv("BROKER_REDIS_URL_FILE")
    settings = check_config(path).settings
    assert settings.callers["billing"].key_digests() == (OTHER_DIGEST,)
    assert settings.account("fleet-eu").password.get_secret_value() == f"sha256:{OTHER_DIGEST}"


def test_a_secret_and_its_file_both_from_variables_is_still_a_problem(
    tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the file's twin gives way; two variables for one secret are ambiguous."""
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_EU__PASSWORD", ENV_PASSWORD)
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_EU__PASSWORD_FILE", str(password_file))
    assert report(config_file(tmp_path, password_file))[0] == [
        "accounts.fleet-eu.password_file: set either password or password_file, not both "
        "(from BROKER_ACCOUNTS__FLEET_EU__PASSWORD_FILE)"
    ]


# --- the caller key pasted instead of its digest ----------------------------------------------


@pytest.mark.parametrize("lines", ["both", "key"])
def test_pasted_new_api_key_output_gets_a_hint_without_the_key(
    tmp_path: Path, password_file: Path, lines: str
) -> None:
    """Both lines of new-api-key, or the key alone, as api_key_sha256: the problem says which
    line belongs there, and never shows the key."""
    key, digest = new_api_key()
    pasted = f"|\n      {key}\n      {digest}" if lines == "both" else f'"{key}"'
    path = config_file(tmp_path, password_file, (f'"sha256:{DIGEST}"', pasted))
    [line] = report(path)[0]
    assert line == (
        "callers.billing.api_key_sha256: this looks like the key itself (line 1 of "
        f"new-api-key); give the sha256:... digest (line 2) (from {path} line 11)"
    )
    assert key[4:12] not in line


def test_pasted_key_in_a_list_or_a_file_gets_the_hint(
    tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a list of digests, in a digest file (by its line) and in a variable alike."""
    key, digest = new_api_key()
    pasted = tmp_path / "digests"
    pasted.write_text(f"{key}\n{digest}\n", encoding="utf-8")
    text = f"""\
redis_url: "memory://"
accounts:
  fleet-eu: {{username: u, password_file: {password_file}}}
callers:
  billing: {{api_key_sha256: ["{digest}", "{key}"], accounts: ["*"]}}
  ops: {{api_key_sha256_file: {pasted}, accounts: ["*"]}}
  audit: {{api_key_sha256: "sha256:{DIGEST}", accounts: ["*"]}}
"""
    monkeypatch.setenv("BROKER_CALLERS__AUDIT__API_KEY_SHA256", key)
    found = report(write_text(tmp_path, text))[0]
    hint = (
        "this looks like the key itself (line 1 of new-api-key); give the sha256:... digest "
        "(line 2)"
    )
    assert found == [
        f"callers.billing.api_key_sha256[1]: {hint} (from {tmp_path / 'config.yaml'} line 5)",
        f"callers.ops.api_key_sha256_file: line 1: {hint} (from {tmp_path / 'config.yaml'} line 6)",
        f"callers.audit.api_key_sha256: {hint} (from BROKER_CALLERS__AUDIT__API_KEY_SHA256)",
    ]
    assert not [line for line in found if key[4:12] in line]


# --- secrets stay secret ----------------------------------------------------------------------


def test_no_secret_in_any_line_check_config_prints(
    tmp_path: Path,
    password_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Passwords, Redis URL passwords, digests and keys, from the file or the environment,
    appear in no problem, warning or source."""
    key, _ = new_api_key()
    secrets = [PASSWORD, ENV_PASSWORD, REDIS_PASSWORD, DIGEST, OTHER_DIGEST, key]
    monkeypatch.setenv("BROKER_REDIS_URL", f"redis+sentinel://:{REDIS_PASSWORD}@db:26379")
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_EU__PASSWORD", f"[{ENV_PASSWORD}")
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_US__PASSWORD", ENV_PASSWORD)
    monkeypatch.setenv("BROKER_ACCOUNTS__FLEET_AP", f'{{"password": ["{ENV_PASSWORD}"]}}')
    monkeypatch.setenv("BROKER_CALLERS__OPS__API_KEY_SHA256", f'["{OTHER_DIGEST}x", "{key}"]')
    monkeypatch.setenv("BROKER_CALLERS__AUDIT", f'{{"api_key_sha256": "{DIGEST}", "x": 1}}')
    monkeypatch.setenv("BROKER_ENCRYPTION_KEYS", f"k1:{PASSWORD}")
    path = config_file(
        tmp_path,
        password_file,
        ('redis_url: "memory://"', f'redis_url: "redis://:{REDIS_PASSWORD}@db:6379/x"'),
        (f'"sha256:{DIGEST}"', f'"sha256:{DIGEST[:-2]}"'),
        ("dialect: legacy", f"dialect: {PASSWORD}"),
        ("    username: ops@example.com", f"    username: ops@example.com\n    pw: {PASSWORD}"),
    )
    assert main(["check-config", "--config", str(path)]) == 2
    shown = capsys.readouterr().out.splitlines()
    monkeypatch.setenv("BROKER_REDIS_URL", f"redis://:{REDIS_PASSWORD}@db:6379/0")
    assert main(["check-config", "--config", str(path)]) == 2
    shown += capsys.readouterr().out.splitlines()
    assert (
        "encryption_keys: line 1: key 'k1' is not valid base64 (from BROKER_ENCRYPTION_KEYS)"
        in (shown)
    )
    assert len(shown) >= 20
    assert any(line.startswith("warning: ") for line in shown)
    assert not [secret for secret in secrets for line in shown if secret[:12] in line]
