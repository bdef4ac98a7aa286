"""The Spark session for `tabular.data.engine: spark`: the master from the environment
(SPARK_MASTER, default local[*]: every core of this machine), not from params, so the same
pipeline runs on a laptop and on a cluster. Missing pyspark or java is a one-line error
saying how to install it. docs/spark.md.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import warnings

from stages.core.cli import StageError


@functools.cache
def session():
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise StageError(
            "tabular.data.engine is spark but pyspark is not installed: "
            "pip install -e '.[spark]' (about 490 MB)"
        ) from None
    if not (shutil.which("java") or os.environ.get("JAVA_HOME")):
        raise StageError(
            "tabular.data.engine is spark but java is not installed: on Debian/Ubuntu, "
            "apt-get install -y openjdk-17-jre-headless (or set JAVA_HOME)"
        )
    # Workers run this interpreter (the venv's), not whatever `python3` is on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    warnings.filterwarnings(
        "ignore", message="PySpark does not yet fully support pandas", category=FutureWarning
    )
    master = os.environ.get("SPARK_MASTER", "local[*]")
    # Shuffles (the split's windows) in as many partitions as local cores (Spark's 200 are
    # hundreds of tiny tasks on one machine); a cluster keeps Spark's default. No web UI,
    # no progress bars on stderr.
    local = master.startswith("local")
    builder = (
        SparkSession.builder.master(master)
        .appName("model-train")
        .config("spark.sql.shuffle.partitions", str(os.cpu_count() or 2) if local else "200")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.session.timeZone", "UTC")
        # Parse every field of every row, so a malformed row fails the first query
        # (read_lines), not whichever later one happens to read its column.
        .config("spark.sql.csv.parser.columnPruning.enabled", "false")
    )
    try:
        spark = builder.getOrCreate()
    except Exception as e:  # noqa: BLE001 - the JVM's failure to start, in one line
        raise StageError(
            f"Spark did not start on {master}: {str(e).strip().splitlines()[0]}"
        ) from None
    spark.sparkContext.setLogLevel("ERROR")
    return spark
