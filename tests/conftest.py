import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EPP_ENVOY_BIN", str(ROOT / ".tools/envoy/envoy/_bin/envoy"))
