"""README promises about the CLI, checked with the real `pgwake` program against a stack:
PGWAKE_<OPTION> for subcommand options, `delete --json`, ephemeral endpoints not suspended."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pgwake.up import Up
from tests.helpers import run
from wakeup.api import ControlAPIError

PGWAKE = str(Path(sys.executable).with_name("pgwake"))


async def test_options_from_env_delete_json_and_ephemeral_never_suspended(stack: Up) -> None:
    assert stack.client is not None
    env = {"PGWAKE_DATA_DIR": str(stack.settings.data_dir), "PGWAKE_TIER": "ephemeral",
           "PGWAKE_NAME": "scratch", "PGWAKE_JSON": "1"}
    code, out, err = await run(PGWAKE, "endpoint", "create", env=env)
    assert code == 0, err
    created = json.loads(out)
    assert created["tier"] == "ephemeral" and created["name"] == "scratch"

    # Through the API: a conflict that says why; through the CLI: that message, exit 1.
    with pytest.raises(ControlAPIError) as refused:
        await stack.client.suspend(created["id"])
    assert refused.value.status == 409 and "ephemeral" in refused.value.message
    code, out, err = await run(PGWAKE, "endpoint", "suspend", created["id"], env=env)
    assert code == 1 and "never suspended" in out + err, out + err
    assert "Traceback" not in out + err
    assert (await stack.client.get_endpoint(created["id"])).state == "active"

    code, out, err = await run(PGWAKE, "endpoint", "delete", created["id"], "--json",
                               env={"PGWAKE_DATA_DIR": str(stack.settings.data_dir)})
    assert code == 0, err
    assert json.loads(out) == {"id": created["id"], "state": "deleted"}
    with pytest.raises(ControlAPIError) as gone:
        await stack.client.get_endpoint(created["id"])
    assert gone.value.status == 404
