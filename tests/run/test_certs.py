"""`fedlora certs`: never replaces a CA or key by accident, and never exposes a secret."""

from __future__ import annotations

import os
import stat

import pytest

from fedlora.run import certs
from fedlora.run.cli import main


def _certs(tmp_path, *args: str) -> int:
    return main(["certs", "--out", str(tmp_path), *args])


def test_a_second_run_refuses_to_replace_the_ca(tmp_path, capsys):
    assert _certs(tmp_path, "--host", "127.0.0.1", "--node", "site-a") == 0
    ca = (tmp_path / certs.CA_CERT).read_bytes()
    key = (tmp_path / "site-a.key").read_bytes()
    assert _certs(tmp_path, "--host", "127.0.0.1") == 2
    err = capsys.readouterr().err
    assert "Refusing to overwrite" in err and "ca.crt" in err and "--force" in err
    assert (tmp_path / certs.CA_CERT).read_bytes() == ca  # nothing was touched
    assert _certs(tmp_path, "--node", "site-a") == 2  # an existing node key too
    assert (tmp_path / "site-a.key").read_bytes() == key


def test_force_replaces_and_node_alone_adds_a_site(tmp_path):
    assert _certs(tmp_path, "--host", "127.0.0.1") == 0
    ca = (tmp_path / certs.CA_CERT).read_bytes()
    assert _certs(tmp_path, "--node", "site-b") == 0  # a new site, same CA
    assert (tmp_path / certs.CA_CERT).read_bytes() == ca
    assert (tmp_path / "site-b.pub").is_file()
    assert _certs(tmp_path, "--host", "127.0.0.1", "--force") == 0
    assert (tmp_path / certs.CA_CERT).read_bytes() != ca
    assert stat.S_IMODE((tmp_path / certs.CA_KEY).stat().st_mode) == 0o600


def test_node_keys_without_a_ca_are_refused(tmp_path, capsys):
    assert _certs(tmp_path, "--node", "site-a") == 2
    assert "No CA" in capsys.readouterr().err


def test_every_secret_is_0600_from_the_moment_it_exists(tmp_path, monkeypatch):
    """Each private key is created with mode 0600, not chmod-ed after its bytes are written."""
    opened: dict[str, int] = {}
    real_open = os.open

    def recording_open(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        opened[os.fspath(path)] = stat.S_IMODE(os.fstat(fd).st_mode)
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    os.umask(0o022)
    certs.make_server_files(tmp_path, ["127.0.0.1"])
    certs.make_node_key(tmp_path, "site-a")
    secrets = {k: v for k, v in opened.items() if k.endswith(".key")}
    assert sorted(os.path.basename(k) for k in secrets) == ["ca.key", "server.key", "site-a.key"]
    assert set(secrets.values()) == {0o600}, secrets


def test_a_throwaway_ca_writes_no_ca_key(tmp_path):
    files = certs.make_server_files(tmp_path, ["127.0.0.1"], keep_ca_key=False)
    assert files.ca.is_file() and not (tmp_path / certs.CA_KEY).exists()


def test_library_refuses_to_overwrite_without_the_flag(tmp_path):
    certs.make_server_files(tmp_path, ["127.0.0.1"])
    with pytest.raises(certs.CertificateExistsError, match="--force"):
        certs.make_server_files(tmp_path, ["127.0.0.1"])
