"""`make demo`: export llava-tiny for trt-sm75 into build/demo (the CLI equivalent of
``vlm-export --model llava-tiny --target trt-sm75 --out build/demo --overwrite``) and print the report summary."""
import sys

from vlmx.export.cli import main

if __name__ == "__main__":
    sys.exit(main(["--model", "llava-tiny", "--target", "trt-sm75", "--out", "build/demo", "--overwrite"]))
