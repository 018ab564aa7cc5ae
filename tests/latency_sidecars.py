"""A stand-in for the reference's latency predictor sidecars (GIE v1.5 latencypredictor
training_server.py / prediction_server.py), speaking their HTTP API with the JSON shapes of
epp/requestcontrol/producers/latency/sidecar_json.py, for the tests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeSidecars:
    """The reference predictor sidecars' HTTP API (training server: POST /add_training_data_bulk;
    prediction server: POST /predict/bulk/strict), answering every prediction with TTFT_MS."""

    TTFT_MS, TPOT_MS = 123.0, 4.0

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s  # how long each answer takes (a slow sidecar)
        self.entries: list[dict] = []
        self.predict_requests: list[dict] = []
        self.padding = 0  # extra bytes in each prediction answer (an oversized answer)
        sidecars = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                threading.Event().wait(sidecars.delay_s)
                if self.path == "/add_training_data_bulk":
                    sidecars.entries.extend(body["entries"])
                    self._reply(202, {"message": f"accepted {len(body['entries'])} entries"})
                elif self.path == "/predict/bulk/strict":
                    sidecars.predict_requests.extend(body["requests"])
                    self._reply(200, {"predictions": [
                        {"ttft_ms": sidecars.TTFT_MS, "tpot_ms": sidecars.TPOT_MS, "ttft_uncertainty": 0,
                         "tpot_uncertainty": 0, "ttft_prediction_bounds": [0, 0], "tpot_prediction_bounds": [0, 0],
                         "predicted_at": "2026-01-01T00:00:00Z", "model_type": "bayesian_ridge",
                         "objective_type": "quantile", "quantile": 0.9, "last_model_load": None}
                        for _ in body["requests"]], "total_requests": len(body["requests"]),
                        "successful_predictions": len(body["requests"]), "failed_predictions": 0,
                        "processing_time_ms": 1.0, **({"padding": "x" * sidecars.padding} if sidecars.padding else {})})
                else:
                    self._reply(404, {"detail": "Not Found"})

            def _reply(self, status: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
