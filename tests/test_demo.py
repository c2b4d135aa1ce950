"""edgernn demo through a real MQTT broker, reusing the session's model folder."""

import re

from edgernn.cli import main


def test_demo_through_mqtt_broker_reports_table(basicmotions_model, mosquitto, capsys):
    code = main(["demo", "--out", str(basicmotions_model), "--mqtt",
                 f"127.0.0.1:{mosquitto.port}", "--streams", "8"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"reusing {basicmotions_model}" in out  # same inputs: no rebuild
    assert "predictions: 4000/4000 frames" in out
    correct = int(re.search(r"accuracy at the last frame: (\d+)/40", out).group(1))
    assert correct >= 34
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\w+", line)]
    assert len(rows) == 40
    assert {int(line.split()[1]) for line in rows} == set(range(8))
    assert f"received through MQTT broker 127.0.0.1:{mosquitto.port}" in out
