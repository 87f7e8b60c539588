"""huggingface_hub's side of tests/hub_ids.rs: a Hub cache laid out by huggingface_hub itself,
and huggingface_hub reading a cache masklm wrote.

    # hf_hub_download each FILE of REPO at REVISION from ENDPOINT into CACHE (a missing FILE is
    # recorded in .no_exist/, as transformers' optional files are); prints
    # {"snapshot": folder, "commit": hash}
    python scripts/make_hub_cache.py download --endpoint URL --cache DIR --repo ID FILE...

    # offline: snapshot_download(local_files_only=True), try_to_load_from_cache for each FILE,
    # and scan_cache_dir's view of the cache; prints JSON
    python scripts/make_hub_cache.py check --cache DIR --repo ID [--revision R] FILE...

Run with the pinned reference Python (scripts/requirements.txt: huggingface_hub==2.4.0).
"""

import argparse
import json
import os
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["download", "check"])
    parser.add_argument("--endpoint")
    parser.add_argument("--cache", required=True)
    parser.add_argument("--repo", required=True)
    parser.add_argument("--revision", default="main")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    if args.endpoint:
        # Read when huggingface_hub is imported.
        os.environ["HF_ENDPOINT"] = args.endpoint
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    import huggingface_hub
    from huggingface_hub import (
        _CACHED_NO_EXIST,
        hf_hub_download,
        scan_cache_dir,
        snapshot_download,
        try_to_load_from_cache,
    )
    from huggingface_hub.errors import RemoteEntryNotFoundError

    if args.command == "download":
        snapshot = None
        for name in args.files:
            try:
                path = hf_hub_download(
                    args.repo, name, revision=args.revision, cache_dir=args.cache
                )
                snapshot = os.path.dirname(path)
            except RemoteEntryNotFoundError:
                # The repo has no such file: huggingface_hub records it in .no_exist/.
                pass
        print(json.dumps({"snapshot": snapshot, "commit": os.path.basename(snapshot)}))
        return

    snapshot = snapshot_download(
        args.repo, revision=args.revision, cache_dir=args.cache, local_files_only=True
    )
    files = {}
    for name in args.files:
        found = try_to_load_from_cache(
            args.repo, name, cache_dir=args.cache, revision=args.revision
        )
        files[name] = "no_exist" if found is _CACHED_NO_EXIST else found
    report = scan_cache_dir(args.cache)
    repos = [
        {
            "repo_id": repo.repo_id,
            "refs": sorted(repo.refs),
            "revisions": sorted(r.commit_hash for r in repo.revisions),
            "files": sorted(
                f.file_name for r in repo.revisions for f in r.files
            ),
        }
        for repo in report.repos
    ]
    print(
        json.dumps(
            {
                "version": huggingface_hub.__version__,
                "snapshot": snapshot,
                "files": files,
                "repos": repos,
                "warnings": [str(w) for w in report.warnings],
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
