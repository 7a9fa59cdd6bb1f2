"""`mlkd serve`: a student (or teacher) behind an HTTP API with dynamic batching, metrics and a web page."""

from __future__ import annotations

import argparse

from mlkd.cli.common import add_precision_options, non_negative_float, positive_float, positive_int


def run(args: argparse.Namespace) -> None:
    from mlkd.serve.server import require_extra, serve

    require_extra()
    serve(args.model, host=args.host, port=args.port, workers=args.workers, precision=args.precision,
          device=args.device, calibration=args.calibration, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
          max_queue=args.max_queue or 8 * args.max_batch, max_upload_mb=args.max_upload_mb,
          log_level="warning" if args.quiet else "info")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a student (or teacher) over HTTP: JSON API, batching, web page",
                       description="Serve a trained model over HTTP: POST /v1/predict (a student's labels) or "
                                   "/v1/detect (a teacher's detections), GET /v1/model, /healthz, /readyz, /metrics "
                                   "(Prometheus), /openapi.json, and a web page at /. Requests arriving within "
                                   "--max-wait-ms run as one batch. Needs mlkd[serve]. docs/serve.md has it all.",
                       epilog="examples:\n  mlkd serve --model runs/demo/seed0/student_kd/last.pt\n"
                              "  curl -F file=@photo.jpg 'http://127.0.0.1:8000/v1/predict?top_k=3'",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR|CKPT",
                   help="a model folder (`mlkd export --format safetensors`) or a checkpoint (last.pt)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network, "
                        "without authentication)")
    p.add_argument("--port", type=positive_int, default=8000, help="port (default 8000)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)")
    add_precision_options(p)
    p.add_argument("--max-batch", type=positive_int, default=32, metavar="N", help="images per batch at most (32)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=5.0, metavar="MS",
                   help="how long a batch waits for more images after its first (5 ms)")
    p.add_argument("--max-queue", type=positive_int, metavar="N",
                   help="images waiting at most; beyond it requests get 503 with Retry-After (default 8 x max-batch)")
    p.add_argument("--max-upload-mb", type=positive_float, default=16.0, metavar="MB",
                   help="largest request body in MiB; a larger one gets 413, read no further (16)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="server processes, each with its own model, batcher and metrics (default 1)")
    p.add_argument("--quiet", action="store_true", help="log warnings only (no access log)")
    p.set_defaults(func=run)
