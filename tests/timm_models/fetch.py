"""Fetch timm's tests/test_models.py for the installed timm version from its PyPI source archive (not vendored)
and add llamavit's families to the lists timm keeps for its ViT families. Usage: python fetch.py DEST_DIR"""
import glob
import os
import subprocess
import sys
import tarfile
import tempfile

import timm

# what timm's NON_STD_FILTERS and FEAT_INTER_FILTERS say of its ViTs, said of ours ('vit_*' already covers
# vit_llama_* and vit_smollm2_*; llamavit registers every model from the module llamavit.models.registry)
NON_STD = ["illama_*", "ladder_vit_*", "visionllama*", "aim_*"]
FEAT_INTER = ["registry"]


def main(dest: str) -> None:
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"timm=={timm.__version__}", "--no-deps",
                        "--no-binary", ":all:", "-d", tmp], check=True)
        (archive,) = glob.glob(os.path.join(tmp, "timm-*.tar.gz"))
        with tarfile.open(archive) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("/tests/test_models.py"))
            source = tar.extractfile(member).read().decode()
    for name, extra in (("NON_STD_FILTERS = [", NON_STD), ("FEAT_INTER_FILTERS = [", FEAT_INTER)):
        if name not in source:
            raise SystemExit(f"timm {timm.__version__}'s test_models.py has no {name.split()[0]}: update fetch.py")
        source = source.replace(name, name + "".join(f"{p!r}, " for p in extra), 1)
    with open(os.path.join(dest, "test_models.py"), "w") as f:
        f.write(f"# timm {timm.__version__} tests/test_models.py, fetched by tests/timm_models/fetch.py\n" + source)
    print(f"timm {timm.__version__} test_models.py -> {dest}")


if __name__ == "__main__":
    main(sys.argv[1])
