import sys
from pathlib import Path

# The tools are scripts, not an installed package: import them from tools/.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
