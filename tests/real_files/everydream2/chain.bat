python train.py --config chain0.json
python train.py --config chain1.json
python train.py --config chain2.json

pause