@echo off
rem The launcher's basic forms: edit one setting of a preset, or pass model folders to train_j.py.
rem Run from anywhere; paths are relative to the repository root.
cd /d "%~dp0.."

python train_json_edit.py configs\ADDifT_Style_SDXL.json --override train_learning_rate:0.0001
if errorlevel 1 exit /b %errorlevel%

python train_json_edit.py configs\ADDifT_Style_SDXL.json ^
    --models-dir D:\path\to\models ^
    --ckpt-dir D:\path\to\checkpoints
if errorlevel 1 exit /b %errorlevel%
