"""Benchmark fedtwin and write the figures to one JSON file.

  (a) the demo's setting: 4 hospitals, Dirichlet alpha 0.5, epsilon 10, delta 1e-5:
      TSTR/TRTR on val, Fréchet distance, precision/recall/density/coverage, wall time,
      and per hospital its holdout scored by the twin's classifier and by its own trained
      on its images alone and with the twin (hybrid) (runs the `fedtwin demo` command;
      --runs independent runs, all kept)
  (b) the same generator and plan trained centrally: one hospital holding all the data
      (--runs runs)
  (i) the demo's setting at epsilon 1 (--eps1-runs runs)
  (c) the baseline a twin must beat: a DP-SGD classifier trained federated at the same
      epsilon directly on the real data (same hospitals)
  (d) throughput: DP vs non-DP local training samples/s for the same model, generation
      images/s, DICOM files written/s
  (e) the privacy audit: wall time per hospital (audit + utility scoring) for twins of
      1k, 5k and 20k images, and its growth with the twin's size; and, as calibration, the
      audit of real val images posing as a twin (what a twin that is as close to the
      hospitals as new real patients would score)
  (f) the catalog: 8 concurrent pulls of a 20k-image twin from a `fedtwin catalog serve`
      process over mutual TLS on 127.0.0.1: throughput (MB/s) vs a plain local copy of
      the same files, and the server's memory (RSS) before, during and after
  (g) the diffusion generator (model=ddpm): DP and non-DP training samples/s, sampling
      images/s, and the demo's setting trained with it (TSTR, audit, wall time), at the
      largest size that finishes in 30 minutes on the CPU, or the default size on a GPU
  (h) deployment: the same training run over real processes on 127.0.0.1 (SuperLink over
      TLS, one SuperNode per hospital, `flwr run`), with and without SecAgg+: wall time per
      round against the same local compute alone (overhead ratio), and the bytes sent per
      round to and from each hospital
  (j) image size and colour: seconds per DP step of each generator at 28 and 64 px, grey
      and colour, and of the DCGAN at 128 px; the ratio to 28 px grey and the private
      module's parameter count

  (k) the ladder that locates the loss: the generator without DP and central, three times
      the rounds (the capacity ceiling) and at the default schedule (--runs runs each);
      DP central is (b), DP federated (a)
  (l) an audit that proves it can see: the demo's setting with canaries (100 per hospital,
      each trained on by a secret coin) at epsilon 1, epsilon 10 and with DP off (the
      positive control), --runs runs each: canaries guessed / right, the empirical epsilon
      lower bound beside the accounted epsilon, and the issue's acceptance checks
  (m) MNIST, the DP image-synthesis yardstick (DPImageBench's split, --mnist PATH): one
      hospital at epsilon 10 and 1 on a longer schedule, --runs runs each: the accuracy
      of a classifier trained on the twin, on val, beside the realism figures

Every demo run also keeps the realism figures: the two-sample test's AUC (twin against
real val, and its real-against-real floor) and the spectral distance over its floor.

One module per part: twin_quality (a, b, i, k, m), baseline (c), throughput (d), audit (e),
catalog (f), diffusion (g), deployment (h), image_size (j), canaries (l); common holds what several
parts share and run is the runner that writes the JSON.

Usage: python -m benchmarks --out runs/benchmark.json [--quick] [--runs 3] [--eps1-runs 1]
       [--parts a,b,c,d,e,f,g,h,i,j,k,l,m] [--mnist PATH] [--last-round-alone]
       [hydra overrides...]. Without --parts: every part, (m) only with --mnist. Each part is
written as soon as it ends; a failed part records its error and the others still run.
(`python scripts/benchmark.py ...` is the same.)
"""
