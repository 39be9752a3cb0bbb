"""The agent stays up and truthful when its surroundings are wrong."""

from __future__ import annotations

import subprocess

from daemons import AgentProcess, python_executable


def test_second_agent_on_the_same_state_refuses_and_harms_nothing(tmp_path, agent):
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    with open(img, "wb") as fh:
        fh.truncate(4 << 20)
    agent.add_vm("one", [img])
    logs_before = sorted(p.name for p in tmp_path.glob("d.img.*.hrl"))
    result = subprocess.run([python_executable(), "-m", "hvr_agent", "--config", str(agent.config_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 4, result.stderr
    assert "already using" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("d.img.*.hrl")) == logs_before
    agent.cut("one")  # the running agent is unharmed
    assert agent.list_vms()[0]["name"] == "one"


def test_missing_image_makes_only_that_vm_unavailable(tmp_path):
    agent = AgentProcess(tmp_path / "agent")
    agent.start().wait_ready()
    try:
        good, bad = tmp_path / "good.img", tmp_path / "bad.img"
        for p in (good, bad):
            with open(p, "wb") as fh:
                fh.truncate(4 << 20)
        agent.add_vm("good", [good])
        agent.add_vm("bad", [bad])
        agent.terminate()
        bad.unlink()
        agent.start().wait_ready()
        vms = {v["name"]: v for v in agent.list_vms()}
        assert vms["bad"]["state"] == "Unavailable" and "does not exist" in vms["bad"]["error"]
        assert "state" not in vms["good"] or vms["good"]["state"] != "Unavailable"
        table = agent.hvrctl("vm", "list").stdout
        assert "bad is unavailable" in table
        agent.hvrctl("vm", "remove", "bad")
        assert [v["name"] for v in agent.list_vms()] == ["good"]
    finally:
        agent.close()


def test_unknown_route_and_method_answer_json(agent):
    import http.client
    import json
    import socket

    class Conn(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(str(agent.admin_socket))

    c = Conn("localhost")
    c.request("PUT", "/v1/vms")
    r = c.getresponse()
    assert r.status == 405 and "GET" in r.getheader("Allow", "") and json.loads(r.read())["code"] == "http_error"
    c.request("GET", "/v1/nothing")
    r = c.getresponse()
    assert r.status == 404 and json.loads(r.read())["code"] == "http_error"
