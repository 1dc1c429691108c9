@echo off
rem Override batch size and step count, and tell train_j.py where models and checkpoints live.
rem Run from anywhere; paths are relative to the repository root.
cd /d "%~dp0.."

python train_json_edit.py configs\base_settings.json ^
    --override train_batch_size:4 ^
    --override train_iterations:100 ^
    --models-dir D:\data\trained_models ^
    --ckpt-dir D:\data\trained_models\checkpoints
if errorlevel 1 exit /b %errorlevel%
