"""Real bulk HTML for the scale benchmarks: Debian's documentation packages written as WARC.

    python bench/debian_docs.py OUT_DIR [--copies 4] [--pages-per-file 300]

`apt-get download` fetches python3.11-doc, postgresql-doc-15 and python-django-doc (2,391 HTML
pages; the only download, from Debian's package registry), `dpkg -x` unpacks them, and warcio
writes the pages as WARC response records, one gzip member each, `--pages-per-file` to a file,
with Common Crawl's `WARC-Identified-Payload-Type` (without it datatrove's WarcReader sniffs
each payload with libmagic and drops the 63% it does not call text/html).
Copy c of a page has its own URL (`https://docs.example.org/<c>/<path>`), so `--copies 16`
is 16x the input (copies are exact duplicates of each other: dedup removes them, after hashing
every one). Nothing here is committed; the packages are cached in OUT_DIR/debs.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import uuid
from pathlib import Path

PACKAGES = ("python3.11-doc", "postgresql-doc-15", "python-django-doc")


def pages(work: Path) -> list[Path]:
    debs, tree = work / "debs", work / "tree"
    if not tree.is_dir():
        debs.mkdir(parents=True, exist_ok=True)
        if not list(debs.glob("*.deb")):
            subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True, capture_output=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True)
    return sorted(tree.rglob("*.html"))


def write_warcs(work: Path, out: Path, copies: int, pages_per_file: int = 300) -> list[Path]:
    """The WARC files of `copies` copies of the pages (written once, then reused)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    found = pages(work)
    out.mkdir(parents=True, exist_ok=True)
    files = sorted(out.glob("*.warc.gz"))
    if files:
        return files
    entries = [(c, page) for c in range(copies) for page in found]
    for start in range(0, len(entries), pages_per_file):
        path = out / f"debian-docs-{start // pages_per_file:05d}.warc.gz"
        with open(path, "wb") as handle:
            writer = WARCWriter(handle, gzip=True)
            for copy, page in entries[start:start + pages_per_file]:
                body = page.read_bytes()
                url = f"https://docs.example.org/{copy}/{page.relative_to(work / 'tree')}"
                http = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8"),
                                                   ("Content-Length", str(len(body)))], protocol="HTTP/1.1")
                record = writer.create_warc_record(
                    url, "response", payload=io.BytesIO(body), length=len(body), http_headers=http,
                    warc_headers_dict={"WARC-Date": "2024-06-01T00:00:00Z",
                                       "WARC-Record-ID": f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, url)}>",
                                       # as Common Crawl writes it: readers need not sniff the payload
                                       "WARC-Identified-Payload-Type": "text/html"})
                writer.write_record(record)
    return sorted(out.glob("*.warc.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--pages-per-file", type=int, default=300)
    args = parser.parse_args()
    files = write_warcs(args.out, args.out / f"x{args.copies}", args.copies, args.pages_per_file)
    print(f"{len(files)} WARC files in {args.out / f'x{args.copies}'}")


if __name__ == "__main__":
    main()
