import sys, re
runs = sys.argv[1:]
rows = ["s3 +0 ms", "s3 +20 ms", "s3 +100 ms", "s3 +100 ms, recommended", "s3 +100 ms, cache"]
data = {}
for r in runs:
    name, path = r.split("=")
    text = open(path).read()
    when = re.search(r"2026-12-07 (\d\d:\d\d)", text).group(1)
    d = {}
    for line in text.splitlines():
        if line.startswith("| local") or line.startswith("| s3"):
            c = [x.strip() for x in line.split("|")[1:-1]]
            d[c[0]] = c
    data[name] = (when, d)
print("| run (UTC, load) | local CPU ms/image | " + " | ".join(f"{x}: ratio (CPU ms/image)" for x in rows) + " | requests/s +20 ms | bytes on the link +20 / +100 ms, mean / max |")
print("|---" * (len(rows) + 4) + "|")
for name, (when, d) in data.items():
    loads = [float(c[-1]) for c in d.values()]
    cells = [f"{d[x][3]} ({d[x][5]})" for x in rows]
    print(f"| {name} ({when}, load {min(loads):.1f}-{max(loads):.1f}) | {d['local'][5]} | " + " | ".join(cells)
          + f" | {d['s3 +20 ms'][6]} | {d['s3 +20 ms'][7]} / {d['s3 +100 ms'][7]} |")
