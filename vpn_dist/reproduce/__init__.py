"""A paper table's grid of runs in four jobs: `grid` (the tables, the plan and each run's config), `command` (the
`vpn-dist reproduce` command: run the grid on the sweep driver, record each run), `report` (runs.csv, curves.csv,
report.md and figures; no Ray needed) and `stats` (the paired statistics)."""
