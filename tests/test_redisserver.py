"""The test redis-server itself: a restart keeps its keys only with an append-only file, as CONTRACT §7 expects."""
import pytest

from redisserver import RedisServer, command

pytestmark = pytest.mark.timeout(30)


def put_and_restart(server):
    """Write one key, restart the server, and say whether the key came back (and on which port)."""
    port = server.port
    assert command(port, "SET", "soak-key", "kept") == b"+OK"
    server.restart()
    assert server.port == port, "a restart must come back where clients expect it"
    return command(port, "EXISTS", "soak-key") == b":1"


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
def test_an_append_only_file_keeps_keys_across_a_restart(appendfsync):
    with RedisServer(appendonly=True, appendfsync=appendfsync) as server:
        assert put_and_restart(server)
        assert put_and_restart(server), "a second restart reads back the file the first one left"


def test_without_an_append_only_file_a_restart_loses_every_key():
    with RedisServer() as server:
        assert not put_and_restart(server)


def test_an_unknown_fsync_policy_is_refused_before_anything_starts():
    with pytest.raises(ValueError, match="appendfsync"):
        RedisServer(appendonly=True, appendfsync="sometimes")
