# One-click tests from PowerShell. pipe targets Linux (process groups, flock, seccomp), so this
# runs the same script as run_tests.sh, through bash (e.g. PowerShell on Linux, or WSL).
$ErrorActionPreference = "Stop"
Set-Location $PSScriptRoot
bash ./run_tests.sh
exit $LASTEXITCODE
