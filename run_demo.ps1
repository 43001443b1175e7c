# Builds the release binary and runs the demo pipeline twice (second run skips everything).
$ErrorActionPreference = "Stop"
Set-Location $PSScriptRoot
cargo build --release --locked --quiet
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
$pipe = Join-Path $PSScriptRoot "target/release/pipe"
Write-Host "--- first build: runs both stages"
& $pipe build
if ($LASTEXITCODE -ne 0) { exit $LASTEXITCODE }
Write-Host "--- second build: nothing changed, both stages skipped"
& $pipe build
exit $LASTEXITCODE
